"""The serving ceiling: the real server on a model that costs almost nothing to run.

A 1-layer BERT 32 wide (random weights, all-MiniLM-L6-v2's tokenizer and pipeline files)
makes compute nearly nil, so what is measured is the path around the model: the client,
gRPC, tokenising, scheduling, the engine workers' round trips, encoding the vectors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from akidb_embed_client import EmbedClient

from .engine_bench import model_spec, processes_cpu_seconds, run_pool

NARROW = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
}


def build_narrow_model(minilm: Path, directory: Path) -> Path:
    """MiniLM's tokenizer and pipeline, a 1-layer 32-wide encoder with random weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from akidb_embed.modeling.models import bert

    directory.mkdir(parents=True, exist_ok=True)
    for item in minilm.iterdir():
        if item.name == "model.safetensors" or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, directory / item.name, dirs_exist_ok=True)
        else:
            shutil.copy(item, directory / item.name)
    config = json.loads((minilm / "config.json").read_text()) | NARROW
    (directory / "config.json").write_text(json.dumps(config))
    model = bert.Model(bert.ModelArgs.from_dict(config))
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    return directory


@dataclass(frozen=True)
class CpuUse:
    """The CPU a run cost: the server with its engine workers, and the client (this
    process). `bound_items_per_second` is the rate at which that much CPU per item would
    keep every core of the machine busy: no path that does this work per item goes faster
    on this machine, whatever is overlapped."""

    us_per_item: float
    cores_busy: float
    bound_items_per_second: float


@dataclass(frozen=True)
class Ceiling:
    stream_coalesced_items_per_second: float
    stream_one_item_per_message_items_per_second: float
    embed_256_items_per_second: float
    # The same calls, 4 in flight at once (as several query paths of a database would send).
    embed_256_4_in_flight_items_per_second: float
    items: int
    # Per row above (same keys without "_items_per_second"): what its best run cost.
    cpu: dict[str, CpuUse] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuFloor:
    """The CPU per item that any serving path of these texts spends, measured without one:
    the tokenizer's batch call (groups of 256) and the forward in the engine workers (no
    gRPC; the cheapest of a few batch budgets). `bound_items_per_second`: the rate at which
    that alone fills every core, before a byte of transport."""

    tokenize_us_per_item: float
    compute_us_per_item: float
    compute_batch_tokens: int
    bound_items_per_second: float


FLOOR_MIN_ITEMS = 20_000


def cpu_floor(directory: Path, texts: Sequence[str], workers: int) -> CpuFloor:
    """Measure `CpuFloor` for the model in `directory` on `texts`."""
    from akidb_embed.modeling.engine import EmbedOptions
    from akidb_embed.modeling.loader import load_engine

    # CPU times advance in 10 ms ticks: a few hundred texts (a --quick run) cost less than
    # one, so they are repeated up to FLOOR_MIN_ITEMS.
    texts = list(texts) * -(-FLOOR_MIN_ITEMS // max(1, len(texts)))
    engine = load_engine(directory, name="floor", source="floor", revision="bench")
    groups = [texts[start : start + 256] for start in range(0, len(texts), 256)]
    options = EmbedOptions()
    for group in groups[:4]:
        engine.tokenize_batch(group, options)
    before = processes_cpu_seconds([os.getpid()])
    batches = [engine.tokenize_batch(group, options) for group in groups]
    tokenize = (processes_cpu_seconds([os.getpid()]) - before) / len(texts)
    ids = [row.ids for batch in batches for row in batch.texts()]
    spec = model_spec("floor", directory)
    costs = {}
    for budget in (2048, 16384):
        run = run_pool(spec, ids, engine.profile.dimensions, budget, workers, max_rows=budget // 4)
        costs[budget] = run.cpu_seconds / len(ids)
    budget = min(costs, key=lambda b: costs[b])
    return CpuFloor(
        tokenize * 1e6, costs[budget] * 1e6, budget, _cores() / (tokenize + costs[budget])
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(server_pid: int) -> float:
    """User + system CPU of the server, its engine workers and this process so far."""
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    return processes_cpu_seconds([server_pid, *(c.pid for c in children), os.getpid()])


def _best(
    run: Callable[[], float], items: int, server_pid: int, runs: int = 2
) -> tuple[float, CpuUse]:
    """The best of `runs` rates, with the CPU that run cost."""
    cores = _cores()
    best: tuple[float, CpuUse] | None = None
    for _ in range(runs):
        cpu, started = _cpu_seconds(server_pid), time.perf_counter()
        rate = run()
        seconds, spent = time.perf_counter() - started, _cpu_seconds(server_pid) - cpu
        per_item = spent / items
        use = CpuUse(per_item * 1e6, spent / seconds, cores / per_item)
        if best is None or rate > best[0]:
            best = (rate, use)
    assert best is not None
    return best


def _stream(client: EmbedClient, texts: Sequence[str], per_message: int) -> float:
    started = time.perf_counter()
    count = 0
    for result in client.embed_stream(texts, max_items_per_message=per_message):
        if result.error is not None:
            raise RuntimeError(f"stream item failed: {result.error}")
        count += 1
    seconds = time.perf_counter() - started
    assert count == len(texts)
    return len(texts) / seconds


def _embed(client: EmbedClient, texts: Sequence[str], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        client.embed(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - started)


def _embed_in_flight(client: EmbedClient, texts: Sequence[str], batch: int, calls: int) -> float:
    chunks = [texts[start : start + batch] for start in range(0, len(texts), batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        answered = sum(len(r.vectors) for r in pool.map(client.embed, chunks))
    assert answered == len(texts)
    return len(texts) / (time.perf_counter() - started)


def measure(target: str, texts: Sequence[str], one_per_message: int, server_pid: int) -> Ceiling:
    """Best of two runs each; the 1-item-per-message run uses the first `one_per_message`."""
    with EmbedClient(target, timeout=600) as client:
        _stream(client, texts[:2000], 256)  # warm: every batch shape once
        single_texts = texts[:one_per_message]
        runs = {
            "stream_coalesced": (lambda: _stream(client, texts, 256), len(texts)),
            "stream_one_item_per_message": (
                lambda: _stream(client, single_texts, 1),
                len(single_texts),
            ),
            "embed_256": (lambda: _embed(client, texts, 256), len(texts)),
            "embed_256_4_in_flight": (lambda: _embed_in_flight(client, texts, 256, 4), len(texts)),
        }
        rates: dict[str, float] = {}
        cpu: dict[str, CpuUse] = {}
        for key, (run, items) in runs.items():
            rates[key], cpu[key] = _best(run, items, server_pid)
    return Ceiling(
        rates["stream_coalesced"],
        rates["stream_one_item_per_message"],
        rates["embed_256"],
        rates["embed_256_4_in_flight"],
        len(texts),
        cpu,
    )
