"""Progress lines while measuring, and the final table."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def step(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {what}", file=sys.stderr, flush=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(r: dict[str, Any]) -> str:
    c = r["corpus"]
    lines = [
        f"akidb-embed bench: {r['model']} on {r['machine']['cpu']} "
        f"({r['machine']['cores']} cores), backend {r['server']['backend']}; load average "
        f"{r['machine']['load_average_at_start'][0]:.1f} at start, "
        f"{r['machine']['load_average_at_end'][0]:.1f} at end",
        f"corpus: {c['count']} stdlib docstring passages, {c['total_tokens']} tokens; tokens "
        f"per text mean {c['mean']:.1f}, p10 {c['p10']}, p50 {c['p50']}, p90 {c['p90']}, "
        f"p99 {c['p99']}, max {c['max']} ({c['truncated']} at the limit)",
        "",
        f"{'':44s} {'texts/s':>9s} {'tokens/s':>9s} {'vs ST':>6s} {'min cos':>10s} {'max abs':>8s}",
    ]
    rows = [
        ("sentence_transformers", "sentence-transformers in-process (torch)"),
        ("engine_in_process", "MLX engine in-process, no gRPC"),
        ("engine_workers", "MLX engine workers, no gRPC"),
        ("served_stream", "served: EmbedStream, Unix socket"),
        ("served_embed_64", "served: Embed, batches of 64"),
        ("served_8_clients", "served: 8 clients, Embed x64"),
    ]
    for key, label in rows:
        if key not in r:
            continue
        e = r[key]
        ratio = f"{e['vs_sentence_transformers']:.2f}x" if "vs_sentence_transformers" in e else ""
        p = e.get("parity", {})
        cos = f"{p['min_cosine']:.7f}" if p else ""
        err = f"{p['max_abs_error']:.1e}" if p else ""
        lines.append(
            f"{label:44s} {e['texts_per_second']:9.1f} {e['tokens_per_second']:9.0f} "
            f"{ratio:>6s} {cos:>10s} {err:>8s}"
        )
    li, ll = r["latency_idle"], r["latency_under_load"]
    pl = r.get("latency_under_load_paced", {})
    eq = r.get("engine_query")
    ce = r.get("ceiling")
    if ce:
        lines += [
            "",
            f"serving ceiling (1-layer 32-wide model, {ce['items']} short texts), items/s:",
            "  EmbedStream, coalesced by the client   "
            f"{ce['stream_coalesced_items_per_second']:9.0f}"
            f"   (plain grpc.aio answering the same messages: "
            f"{ce['echo_coalesced_items_per_second']:.0f})",
            f"  EmbedStream, one item per message      "
            f"{ce['stream_one_item_per_message_items_per_second']:9.0f}"
            f"   (plain grpc.aio: {ce['echo_one_item_per_message_items_per_second']:.0f})",
            f"  Embed, 256 texts per call              {ce['embed_256_items_per_second']:9.0f}",
            "  Embed, 256 texts per call, 4 in flight "
            f"{ce['embed_256_4_in_flight_items_per_second']:9.0f}",
        ]
        if ce.get("cpu"):
            lines.append(
                "  CPU per item (server, engine workers and client), cores busy, and the rate "
                "at which that CPU fills every core:"
            )
            for key, use in ce["cpu"].items():
                lines.append(
                    f"    {key:30s} {use['us_per_item']:7.1f} us  {use['cores_busy']:4.2f} cores"
                    f"  bound {use['bound_items_per_second']:9.0f} items/s"
                )
        if ce.get("floor"):
            floor = ce["floor"]
            lines.append(
                f"    without gRPC: tokenizing {floor['tokenize_us_per_item']:.1f} us + the "
                f"forward in the engine workers {floor['compute_us_per_item']:.1f} us per item "
                f"fill every core at {floor['bound_items_per_second']:.0f} items/s"
            )
    if "ceiling_query" in r and "ceiling_engine_query" in r:
        cq, ceq = r["ceiling_query"], r["ceiling_engine_query"]
        lines.append(
            f"  a query on it, served: p50 {cq['p50_ms']:.2f} ms, p99 {cq['p99_ms']:.2f} ms; "
            f"its forward in this process p50 {ceq['p50_ms']:.2f} ms: the path adds "
            f"{cq['p50_ms'] - ceq['p50_ms']:.2f} ms"
        )
    if "sidecar_tax" in r:
        lines.append(
            "sidecar tax: served stream / engine workers without gRPC = "
            f"{r['sidecar_tax']['served_stream_vs_engine_workers']:.2f}"
        )
    fb = r["flop_bound"]
    rss = r["rss"]
    lines += [
        "",
        f"query latency (1 text, Embed): idle p50 {li['p50_ms']:.1f} ms, p99 {li['p99_ms']:.1f} ms"
        + (f"; engine forward alone p50 {eq['p50_ms']:.1f} ms" if eq else ""),
        *(
            [
                "  the path's parts, p50: the same query in an engine worker process (no gRPC) "
                f"{r['engine_workers_query']['p50_ms']:.1f} ms; a unary call that plain grpc.aio "
                f"answers at once {r['echo_query']['p50_ms']:.2f} ms"
            ]
            if "engine_workers_query" in r and "echo_query" in r
            else []
        ),
        *(
            f"  during a bulk stream, {what}: p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms; "
            f"bulk {x['bulk_tokens_per_second']:.0f} tokens/s, {x['bulk_vs_alone']:.2f} of the "
            f"same stream just before ({x['bulk_alone_tokens_per_second']:.0f})"
            for what, x in (
                ("queries back to back", ll),
                (f"{pl.get('queries_per_second') or 0:.0f} queries/s", pl),
            )
            if x
        ),
        f"FLOP bound: {fb['matmul_gflop']:.0f} GFLOP of matmuls / {fb['gemm_gflops']:.0f} GFLOP/s "
        f"fp32 GEMM = {fb['bound_texts_per_second']:.0f} texts/s; reached: "
        + ", ".join(
            f"{k} {r[k]['fraction_of_flop_bound']:.0%}"
            for k in ("sentence_transformers", "engine_workers", "served_stream")
            if k in r
        ),
        f"server RSS: {_mib(rss['before_bytes'])} before, {_mib(rss['after_bytes'])} after "
        f"streaming {rss['texts']} short texts ({rss['growth_fraction']:+.1%}; "
        f"{rss['texts_per_second']:.0f} texts/s)",
        "wire, per vector: "
        + "; ".join(
            f"{w['dimensions']}-dim packed bytes encode {w['packed_encode_us']:.1f} us / decode "
            f"{w['packed_decode_us']:.1f} us, repeated float {w['repeated_encode_us']:.1f} / "
            f"{w['repeated_decode_us']:.1f} us"
            for w in r["wire"]
        ),
    ]
    if "encodings" in r:
        from .encodings import summary

        lines.append(summary(r["encodings"]))
    return "\n".join(lines)
