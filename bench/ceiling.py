"""The serving ceiling: the real server on a model that costs almost nothing to run.

A 1-layer BERT 32 wide (random weights, all-MiniLM-L6-v2's tokenizer and pipeline files)
makes compute nearly nil, so what is measured is the path around the model: the client,
gRPC, tokenising, scheduling, the engine workers' round trips, encoding the vectors.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from akidb_embed_client import EmbedClient

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
class Ceiling:
    stream_coalesced_items_per_second: float
    stream_one_item_per_message_items_per_second: float
    embed_256_items_per_second: float
    # The same calls, 4 in flight at once (as several query paths of a database would send).
    embed_256_4_in_flight_items_per_second: float
    items: int


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


def measure(target: str, texts: Sequence[str], one_per_message: int) -> Ceiling:
    """Best of two runs each; the 1-item-per-message run uses the first `one_per_message`."""
    with EmbedClient(target, timeout=600) as client:
        _stream(client, texts[:2000], 256)  # warm: every batch shape once
        coalesced = max(_stream(client, texts, 256) for _ in range(2))
        single = max(_stream(client, texts[:one_per_message], 1) for _ in range(2))
        unary = max(_embed(client, texts, 256) for _ in range(2))
        in_flight = max(_embed_in_flight(client, texts, 256, 4) for _ in range(2))
    return Ceiling(coalesced, single, unary, in_flight, len(texts))
