"""Load: 16 concurrent clients mixing unary calls and streams against a server subprocess.

Every accepted item must be answered exactly once, in order, with the vector of its own text
(checked against a reference embedding of the same text); the only errors are the ones the
clients cause on purpose (empty texts); the server's own counters agree with the clients';
its RSS stays steady after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from akidb_embed_client import EmbedClient
from tests.ops.conftest import ServerProcess, handled, scrape_url, value

CLIENTS = 16
SECONDS = float(os.environ.get("AKIDB_LOAD_SECONDS", "20"))
WARM_UP_SECONDS = 5.0
MiB = 1024 * 1024
WORDS = ["vector", "index", "query", "embedding", "shard", "replica", "token", "batch"]
POOL = [
    " ".join(random.Random(i).choice(WORDS) for _ in range(1 + (i * 5) % 8)) + f" {i}"
    for i in range(48)
]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Tally:
    unary_calls: int = 0
    unary_texts: int = 0
    unary_invalid: int = 0
    streams: int = 0
    stream_items: int = 0
    stream_ok: int = 0
    stream_invalid: int = 0
    unexpected: list[str] = field(default_factory=list)


def check_vector(raw: bytes, index: int, reference: np.ndarray, tally: Tally, where: str) -> None:
    vector = np.frombuffer(raw, dtype="<f4")
    # Batch composition changes padding, not results: any mix-up between texts is ~0.1+ off.
    if vector.shape != (384,) or not np.allclose(vector, reference[index], atol=1e-4):
        tally.unexpected.append(f"{where}: wrong vector for POOL[{index}]")


async def unary(stub: pb_grpc.EmbeddingServiceStub, rng: random.Random, ref: np.ndarray,
                tally: Tally, name: str) -> None:  # fmt: skip
    indices = [rng.randrange(len(POOL)) for _ in range(rng.randint(1, 6))]
    texts = [POOL[i] for i in indices]
    bad = rng.randrange(len(texts)) if rng.random() < 0.1 else None
    if bad is not None:
        texts[bad] = ""
    tally.unary_calls += 1
    try:
        response = await stub.Embed(pb.EmbedRequest(texts=texts), timeout=120)
    except grpc.aio.AioRpcError as error:
        details = error.details() or ""
        if bad is not None and error.code() == INVALID and f"texts[{bad}]" in details:
            tally.unary_invalid += 1
        else:
            tally.unexpected.append(f"{name}: {error.code()} {details}")
        return
    if bad is not None:
        tally.unexpected.append(f"{name}: an empty text was accepted")
        return
    rows = len(response.embeddings.vectors) // (4 * 384)
    if rows != len(texts) or len(response.embeddings.token_counts) != len(texts):
        tally.unexpected.append(f"{name}: {rows} vectors for {len(texts)}")
        return
    for row, index in enumerate(indices):
        check_vector(response.embeddings.vectors[row * 1536 : (row + 1) * 1536], index, ref,
                     tally, name)  # fmt: skip
    tally.unary_texts += len(texts)


async def stream(stub: pb_grpc.EmbeddingServiceStub, rng: random.Random, ref: np.ndarray,
                 tally: Tally, name: str) -> None:  # fmt: skip
    items = []
    for j in range(rng.randint(5, 30)):
        index = rng.randrange(len(POOL))
        items.append((f"{name}-{j}", index, "" if rng.random() < 0.05 else POOL[index]))

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        # Messages of 1 to 4 items: grouped and single items mix in one stream.
        start = 0
        while start < len(items):
            group = items[start : start + rng.randint(1, 4)]
            start += len(group)
            yield pb.EmbedStreamRequest(
                ids=[i for i, _, _ in group], texts=[t for _, _, t in group]
            )

    tally.streams += 1
    tally.stream_items += len(items)
    answered = 0
    try:
        async for response in stub.EmbedStream(requests(), timeout=120):
            failed = {e.index: e for e in response.errors}
            row = 0
            for position, got_id in enumerate(response.ids):
                item_id, index, text = items[answered]
                answered += 1
                if got_id != item_id:
                    tally.unexpected.append(f"{name}: got {got_id} where {item_id} was due")
                elif position not in failed:
                    raw = response.embeddings.vectors[row * 1536 : (row + 1) * 1536]
                    row += 1
                    check_vector(raw, index, ref, tally, item_id)
                    tally.stream_ok += 1
                elif not text and failed[position].code == INVALID.value[0]:
                    tally.stream_invalid += 1
                else:
                    tally.unexpected.append(f"{item_id}: item error {failed[position]}")
    except grpc.aio.AioRpcError as error:
        tally.unexpected.append(f"{name}: stream ended {error.code()} {error.details()}")
    if answered != len(items):
        tally.unexpected.append(f"{name}: {answered} answers for {len(items)} items")


async def client(number: int, target: str, ref: np.ndarray, until: float, tally: Tally) -> None:
    rng = random.Random(1000 + number)
    async with grpc.aio.insecure_channel(f"unix:{target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for call in range(1_000_000):
            if time.monotonic() >= until:
                return
            work = unary if rng.random() < 0.5 else stream
            await work(stub, rng, ref, tally, f"c{number}-{call}")


@pytest.mark.slow
async def test_sixteen_clients_mixing_unary_and_streams(tmp_path: Path) -> None:
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    server = ServerProcess(socket_dir / "embed.sock", tmp_path / "server.log")
    try:
        await asyncio.to_thread(server.wait_serving)
        with EmbedClient(server.target, timeout=60) as reference_client:
            reference = reference_client.embed(POOL).vectors
        rss_start = server.rss_bytes()
        tally = Tally()
        started = time.monotonic()
        until = started + SECONDS
        tasks = [
            asyncio.create_task(client(n, server.target, reference, until, tally))
            for n in range(CLIENTS)
        ]
        await asyncio.sleep(WARM_UP_SECONDS)
        rss_warm = server.rss_bytes()
        rss_samples = []
        while not all(t.done() for t in tasks):
            rss_samples.append(server.rss_bytes())
            await asyncio.sleep(1)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        rss_end = server.rss_bytes()
        metrics = await asyncio.to_thread(scrape_url, server.metrics_url)
    finally:
        server.terminate()
        exit_code = await asyncio.to_thread(server.wait, 60)
        server.close()

    assert not tally.unexpected, tally.unexpected[:20]
    assert exit_code == 0, server.log()
    items = tally.unary_texts + tally.stream_items
    print(
        f"\nload: {CLIENTS} clients, {elapsed:.1f}s: {tally.unary_calls} unary calls "
        f"({tally.unary_texts} texts, {tally.unary_invalid} rejected on purpose), "
        f"{tally.streams} streams ({tally.stream_items} items: {tally.stream_ok} embedded, "
        f"{tally.stream_invalid} rejected on purpose); {items / elapsed:.0f} texts/s; "
        f"unexpected errors: {len(tally.unexpected)}; RSS MiB: start {rss_start / MiB:.0f}, "
        f"after warm-up {rss_warm / MiB:.0f}, max {max(rss_samples) / MiB:.0f}, "
        f"end {rss_end / MiB:.0f}"
    )
    assert tally.unary_calls >= CLIENTS and tally.streams >= CLIENTS
    assert tally.unary_invalid > 0 and tally.stream_invalid > 0

    # The server counted exactly what the clients saw: nothing lost, nothing twice.
    model = "all-minilm-l6-v2"
    assert handled(metrics, "Embed", "OK") == tally.unary_calls - tally.unary_invalid + 1
    assert handled(metrics, "Embed", "INVALID_ARGUMENT") == tally.unary_invalid
    assert handled(metrics, "EmbedStream", "OK") == tally.streams
    assert value(metrics, "akidb_embed_stream_items_total", code="OK") == tally.stream_ok
    assert value(metrics, "akidb_embed_stream_items_total", code="INVALID_ARGUMENT") == (
        tally.stream_invalid
    )
    # Every text computed once: the clients' texts and the reference batch.
    computed = value(metrics, "akidb_embed_texts_total", model=model)
    assert computed == tally.unary_texts + tally.stream_ok + len(POOL)
    assert value(metrics, "akidb_embed_queue_items") == 0
    assert value(metrics, "akidb_embed_tokens_total", model=model) > computed * 3

    # Steady memory: after warm-up, RSS does not keep growing with the work done.
    assert rss_end - rss_warm < 64 * MiB, (rss_warm, rss_end)
    assert max(rss_samples) - rss_warm < 96 * MiB, (rss_warm, max(rss_samples))
