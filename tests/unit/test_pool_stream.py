"""PoolStream's bookkeeping against scripted replicas (no server): sub-streams that break
mid-stream, a replica that drains, none alive, and a status that is the caller's."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import pytest

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb_embed_client import EmbedClientError, PoolCounters
from akidb_embed_client.replicas import PoolStream

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# A lost item shows as a stream that never ends: fail it fast.
pytestmark = pytest.mark.timeout(30)


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "scripted") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def answer(request: pb.EmbedStreamRequest, drain: bool = False) -> pb.EmbedStreamResponse:
    """Each item's vector is its id's number (ids are "i<number>"); draining: UNAVAILABLE."""
    ids = list(request.ids)
    response = pb.EmbedStreamResponse(ids=ids)
    if drain:
        for index in range(len(ids)):
            response.errors.add(index=index, code=UNAVAILABLE, message="shutting down")
        return response
    values = np.array([float(i[1:]) for i in ids], "<f4")
    response.embeddings.CopyFrom(
        pb.EmbeddingBatch(
            vectors=values.tobytes(),
            dimensions=1,
            token_counts=[1] * len(ids),
            truncated=[False] * len(ids),
        )
    )
    response.space.CopyFrom(pb.EmbeddingSpace(fingerprint="fp", dimensions=1))
    return response


Script = Callable[[int, Iterator[pb.EmbedStreamRequest]], Iterator[pb.EmbedStreamResponse]]


class FakeCall:
    def __init__(self, responses: Iterator[pb.EmbedStreamResponse]) -> None:
        self._responses = responses

    def __iter__(self) -> FakeCall:
        return self

    def __next__(self) -> pb.EmbedStreamResponse:
        return next(self._responses)

    def cancel(self) -> bool:
        return True


class FakeStub:
    """`EmbedStream` runs `script(call_number, requests)`."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0
        self.EmbedStream = self._stream

    def _stream(self, requests: Iterator[pb.EmbedStreamRequest], timeout: float | None) -> FakeCall:
        number = self.calls
        self.calls += 1
        return FakeCall(self.script(number, requests))


def pool_stream(script: Script, streams: int) -> PoolStream:
    return PoolStream(
        FakeStub(script),  # type: ignore[arg-type]
        "",
        pb.EmbedOptions(),
        timeout=30,
        max_in_flight=512,
        max_items=64,
        max_chars=1 << 20,
        streams=streams,
        counters=PoolCounters(),
    )


def run(script: Script, n: int, streams: int = 2) -> tuple[list[str], list[float], PoolCounters]:
    stream = pool_stream(script, streams)
    counters = stream.counters
    ids, values = [], []
    for result in stream.run((f"i{k}", f"text {k}") for k in range(n)):
        assert result.error is None, result.error
        assert result.vector is not None and result.space is not None
        ids.append(result.id)
        values.append(float(result.vector[0]))
    return ids, values, counters


def break_one_drain_other(
    number: int, requests: Iterator[pb.EmbedStreamRequest]
) -> Iterator[pb.EmbedStreamResponse]:
    """The first sub-stream breaks after 3 answers; the second's replica starts draining."""
    for answered, request in enumerate(requests):
        if number == 0 and answered == 3:
            raise FakeError(grpc.StatusCode.UNAVAILABLE, "connection reset")
        yield answer(request, drain=number == 1 and answered >= 2)


def test_broken_and_draining_sub_streams_lose_no_item_and_keep_the_order() -> None:
    ids, values, counters = run(break_one_drain_other, 3000)
    assert ids == [f"i{k}" for k in range(3000)]
    assert values == [float(k) for k in range(3000)]
    snapshot = counters.snapshot()
    assert snapshot["streams_broken"] == 1
    assert snapshot["drained_items"] >= 1
    assert snapshot["resent_items"] > snapshot["drained_items"]
    assert snapshot["streams_opened"] >= 2


def test_with_no_replica_the_stream_fails_unavailable_quickly() -> None:
    def script(
        number: int, requests: Iterator[pb.EmbedStreamRequest]
    ) -> Iterator[pb.EmbedStreamResponse]:
        raise FakeError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
        yield  # a generator

    started = time.monotonic()
    with pytest.raises(EmbedClientError) as info:
        run(script, 10)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no replica answered" in info.value.message
    assert "failed to connect" in info.value.message
    assert time.monotonic() - started < 5


def test_a_status_that_is_not_a_replica_failure_ends_the_stream_as_it_is() -> None:
    def script(
        number: int, requests: Iterator[pb.EmbedStreamRequest]
    ) -> Iterator[pb.EmbedStreamResponse]:
        next(requests)
        raise FakeError(grpc.StatusCode.INVALID_ARGUMENT, "2 ids and 1 texts")
        yield

    with pytest.raises(EmbedClientError) as info:
        run(script, 10, streams=1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "2 ids and 1 texts"


def test_a_slow_replica_does_not_set_the_pace() -> None:
    """A sub-stream takes new work only while little of its share is unanswered, so the
    fast replica answers most items and the stream ends long before the slow one would."""
    answered_by: dict[int, int] = {}

    def script(
        number: int, requests: Iterator[pb.EmbedStreamRequest]
    ) -> Iterator[pb.EmbedStreamResponse]:
        # As a transport does, take every message the client sends at once (HTTP/2 buffers
        # them), and answer them one by one: the slow replica, 50 ms a message.
        inbox: queue.Queue[pb.EmbedStreamRequest | None] = queue.Queue()

        def read() -> None:
            for request in requests:
                inbox.put(request)
            inbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (request := inbox.get()) is not None:
            if number == 0:
                time.sleep(0.05)
            answered_by[number] = answered_by.get(number, 0) + len(request.ids)
            yield answer(request)

    n = 4000
    started = time.monotonic()
    ids, values, counters = run(script, n, streams=2)
    elapsed = time.monotonic() - started
    assert ids == [f"i{k}" for k in range(n)] and values == [float(k) for k in range(n)]
    slow_share = answered_by.get(0, 0) / n
    # An even split would give the slow one half, and take it n / 2 / 64 * 50 ms = 1.6 s.
    print(f"\nslow replica: {elapsed:.2f}s, answered by {answered_by}, {counters.snapshot()}")
    assert slow_share < 0.25, answered_by
    assert elapsed < 1.0, elapsed


def async_run(
    script: Script, n: int, take: int | None = None
) -> tuple[list[str], PoolStream, list[int]]:
    """`run`, through the asyncio bridge AsyncEmbedClient uses, with async items; `take`
    results, then close the iterator."""
    import asyncio

    from akidb_embed_client.replicas import bridge_to_async

    stream = pool_stream(script, 2)
    fed: list[int] = []

    async def items() -> AsyncIterator[tuple[str, str]]:
        for k in range(n):
            fed.append(k)
            yield f"i{k}", f"text {k}"

    async def main() -> list[str]:
        ids = []
        results = bridge_to_async(stream, items())
        async for result in results:
            assert result.error is None and result.vector is not None
            assert float(result.vector[0]) == float(result.id[1:])
            ids.append(result.id)
            if take is not None and len(ids) == take:
                await results.aclose()
                break
        return ids

    return asyncio.run(main()), stream, fed


def test_the_async_bridge_fails_over_and_keeps_the_order() -> None:
    ids, stream, _ = async_run(break_one_drain_other, 3000)
    assert ids == [f"i{k}" for k in range(3000)]
    assert stream.counters.snapshot()["resent_items"] >= 1


def test_closing_the_async_stream_early_cancels_it() -> None:
    def script(
        number: int, requests: Iterator[pb.EmbedStreamRequest]
    ) -> Iterator[pb.EmbedStreamResponse]:
        for request in requests:
            yield answer(request)

    ids, stream, fed = async_run(script, 100_000, take=100)
    assert ids == [f"i{k}" for k in range(100)]
    assert stream.finished
    # Reading stopped near the window (512 in flight, a bounded queue ahead of it).
    assert len(fed) < 5_000, len(fed)
