"""`python -m bench --replicas N` (or `make bench-replicas`): aggregate throughput of one
replica against N, on this machine, with the pool clients.

Every replica runs `serve --no-socket --port 0 --workers 0` (one engine in the process) on
loopback. Measured: one bulk EmbedStream of the corpus (the pool client splits it over one
sub-stream per replica), and 8 client threads making unary Embed calls of 16 passages
(spread by round robin). Prints a table and writes bench/results/replicas.json. On a machine
with fewer cores than replicas the replicas share the cores: the numbers show the spread and
its overhead, not a speed-up.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed_client import EmbedClient
from tests.replica_pool import start_replicas

REPO = Path(__file__).resolve().parent.parent


def stream_rate(client: EmbedClient, texts: Sequence[str]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    results = list(client.embed_stream(texts))
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} stream items failed, e.g. {failed[0]}")
    return len(texts) / seconds, np.stack([r.vector for r in results if r.vector is not None])


def unary_rate(client: EmbedClient, texts: Sequence[str], threads: int = 8) -> float:
    batches = [list(texts[i : i + 16]) for i in range(0, len(texts), 16)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client.embed, batches))
    return len(texts) / (time.perf_counter() - started)


def measure(n: int, texts: Sequence[str], workdir: Path, repeats: int) -> dict[str, Any]:
    replicas = start_replicas(workdir, n)
    try:
        addresses = [r.address for r in replicas]
        target: str | list[str] = addresses[0] if n == 1 else addresses
        with EmbedClient(target, timeout=3600) as client:
            client.embed(["warm up"] * 16)
            streams = [stream_rate(client, texts) for _ in range(repeats)]
            unary = max(unary_rate(client, texts) for _ in range(repeats))
            counters = client.counters.snapshot()
        return {
            "replicas": n,
            "stream_texts_per_second": max(rate for rate, _ in streams),
            "unary_texts_per_second": unary,
            "counters": counters,
            "vectors": streams[0][1],
        }
    finally:
        for replica in replicas:
            replica.stop()


def run(replicas: int, texts: Sequence[str], repeats: int, out: Path) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="akidb-embed-bench-replicas-") as tmp:
        for n in sorted({1, replicas}):
            workdir = Path(tmp) / f"pool-{n}"
            workdir.mkdir()
            print(f"... {n} replica(s): {len(texts)} passages, best of {repeats}", flush=True)
            rows.append(measure(n, texts, workdir, repeats))
    diff = float(np.abs(rows[0]["vectors"] - rows[-1]["vectors"]).max())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{len(texts)} passages, {cores} cores, load average {os.getloadavg()[0]:.1f}")
    print("| replicas | bulk stream texts/s | unary (8 threads x 16 texts) texts/s |")
    print("|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['replicas']} | {row['stream_texts_per_second']:.0f} "
            f"| {row['unary_texts_per_second']:.0f} |"
        )
    print(f"max abs diff, 1 vs {replicas} replicas' stream vectors: {diff:.1e}")
    for row in rows:
        del row["vectors"]
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"texts": len(texts), "cores": cores, "max_abs_diff": diff, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
