"""The MLX engine without gRPC: in this process, and in engine worker processes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from akidb_embed.modeling.engine import EmbeddingEngine
from akidb_embed.modeling.tokenization import pack
from akidb_embed.runtime.batching import plan_batches
from akidb_embed.runtime.workers import ModelSpec, WorkerPool


@dataclass(frozen=True)
class EngineRun:
    texts_per_second: float
    tokens_per_second: float
    seconds: float
    padded_fraction: float
    embeddings: np.ndarray
    # CPU (user + system) the timed pass cost the engine workers (with a pool), else 0.
    cpu_seconds: float = 0.0


def _batches(
    ids: Sequence[Sequence[int]], max_batch_tokens: int, max_rows: int = 64
) -> list[list[int]]:
    return plan_batches([len(x) for x in ids], max_batch_tokens, max_rows)


def processes_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU the processes `pids` have spent so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _padded_fraction(ids: Sequence[Sequence[int]], batches: list[list[int]]) -> float:
    real = sum(len(x) for x in ids)
    padded = sum(len(b) * max(len(ids[i]) for i in b) for b in batches)
    return 1 - real / padded


def run_in_process(
    engine: EmbeddingEngine, ids: Sequence[Sequence[int]], max_batch_tokens: int
) -> EngineRun:
    batches = _batches(ids, max_batch_tokens)
    out = np.zeros((len(ids), engine.profile.dimensions), np.float32)
    for batch in batches:  # a first pass traces each batch shape's compiled kernels
        engine.forward([ids[i] for i in batch])
    started = time.perf_counter()
    for batch in batches:
        out[batch] = engine.forward([ids[i] for i in batch])
    seconds = time.perf_counter() - started
    tokens = sum(len(x) for x in ids)
    return EngineRun(
        len(ids) / seconds, tokens / seconds, seconds, _padded_fraction(ids, batches), out
    )


def run_pool(
    spec: ModelSpec,
    ids: Sequence[Sequence[int]],
    dimensions: int,
    max_batch_tokens: int,
    processes: int,
    max_rows: int = 64,
) -> EngineRun:
    batches = _batches(ids, max_batch_tokens, max_rows)
    out = np.zeros((len(ids), dimensions), np.float32)
    with WorkerPool(processes) as pool:
        pool.load(spec)
        for _ in range(2):  # the first pass traces each shape's compiled kernels; time the second
            cpu = processes_cpu_seconds(pool.pids())
            started = time.perf_counter()
            packed = [(b, pack([ids[i] for i in b])) for b in batches]  # as the scheduler does
            futures = [(b, pool.submit(spec.name, p.ids, p.lengths)) for b, p in packed]
            for batch, future in futures:
                out[batch] = future.result()
            seconds = time.perf_counter() - started
            cpu = processes_cpu_seconds(pool.pids()) - cpu
    tokens = sum(len(x) for x in ids)
    return EngineRun(
        len(ids) / seconds, tokens / seconds, seconds, _padded_fraction(ids, batches), out, cpu
    )


def model_spec(name: str, directory: Path) -> ModelSpec:
    return ModelSpec(name=name, directory=directory, source=name, revision="bench")


@dataclass(frozen=True)
class QueryLatency:
    p50_ms: float
    p99_ms: float
    count: int


def query_latency(engine: EmbeddingEngine, queries: Sequence[str]) -> QueryLatency:
    """One query at a time through tokenize + forward, in this process (no gRPC)."""
    from akidb_embed.modeling.engine import EmbedOptions

    options = EmbedOptions()
    engine.forward_packed(*_packed(engine, queries[0], options))
    times = []
    for query in queries:
        started = time.perf_counter()
        engine.forward_packed(*_packed(engine, query, options))
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1e3
    return QueryLatency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms))


def pool_query_latency(
    spec: ModelSpec, engine: EmbeddingEngine, queries: Sequence[str], processes: int
) -> QueryLatency:
    """One query at a time, tokenised here and computed in an engine worker process (no
    gRPC): what the hop to a worker process adds to a query, beside `query_latency`."""
    from akidb_embed.modeling.engine import EmbedOptions

    options = EmbedOptions()
    packed = [_packed(engine, query, options) for query in queries]
    with WorkerPool(processes) as pool:
        pool.load(spec)
        for ids, lengths in packed[:20]:
            pool.submit(spec.name, ids, lengths, interactive=True).result()
        times = []
        for query in queries:
            started = time.perf_counter()
            ids, lengths = _packed(engine, query, options)
            pool.submit(spec.name, ids, lengths, interactive=True).result()
            times.append(time.perf_counter() - started)
    ms = np.array(times) * 1e3
    return QueryLatency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms))


def _packed(engine: EmbeddingEngine, text: str, options: object) -> tuple[np.ndarray, np.ndarray]:
    tokens = engine.tokenize_batch([text], options)  # type: ignore[arg-type]
    return tokens.ids, tokens.lengths
