"""A pool of 3 replicas on loopback TCP ports: unary calls spread by round robin, a bulk
stream survives one replica killed (-9) and one draining (SIGTERM) mid-stream, and with no
replica left the client reports UNAVAILABLE at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from akidb_embed_client import EmbedClient, EmbedClientError
from tests.ops.conftest import handled, scrape_url
from tests.replica_pool import Replica, start_replicas

N_ITEMS = 20_000
DISTINCT = 1_000  # texts repeat, ids do not: the reference is one batch per distinct text


def text_of(i: int) -> str:
    return f"passage {i % DISTINCT} on vectors"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[list[Replica]]:
    replicas = start_replicas(tmp_path, 3, "--grace", "20")
    yield replicas
    for replica in replicas:
        replica.stop()


def streaming(pool: list[Replica]) -> list[Replica]:
    """The replicas serving an EmbedStream now (started and not yet handled). Sub-streams
    go where round robin and the slow-replica rule put them: a replica with none of them
    would be killed without breaking anything."""

    def open_streams(replica: Replica) -> float:
        samples = scrape_url(replica.metrics_url)
        count = {"grpc_server_started_total": 1, "grpc_server_handled_total": -1}
        return sum(
            count[name] * number
            for (name, labels), number in samples.items()
            if name in count and dict(labels).get("grpc_method") == "EmbedStream"
        )

    found = [replica for replica in pool if replica.proc.poll() is None and open_streams(replica)]
    assert found, "no replica serves the stream"
    return found


def reference(address: str) -> np.ndarray:
    """Every distinct text's vector from one replica alone."""
    with EmbedClient(address, timeout=120) as single:
        texts = [text_of(i) for i in range(DISTINCT)]
        return np.concatenate(
            [single.embed(texts[i : i + 250]).vectors for i in range(0, DISTINCT, 250)]
        )


def test_a_list_of_addresses_is_one_round_robin_target() -> None:
    from akidb_embed_client.replicas import count_endpoints, is_pool_target, list_target

    target = list_target(["127.0.0.1:5001", "localhost:5002"])
    assert target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert is_pool_target(target) and count_endpoints(target) == 2
    assert is_pool_target("dns:///embed-pool.ns.svc:50051")
    assert not is_pool_target("127.0.0.1:5001") and not is_pool_target("unix:/x.sock")
    assert count_endpoints("dns:///localhost:50051") >= 1
    with pytest.raises(ValueError, match="host:port"):
        list_target(["no-port"])


@pytest.mark.slow
def test_unary_calls_spread_evenly_and_no_replica_is_unavailable_at_once(
    pool: list[Replica],
) -> None:
    addresses = [r.address for r in pool]
    with EmbedClient(addresses, timeout=30) as client:
        for _ in range(30):  # every connection up
            client.embed(["warm up"])
        before = [handled(scrape_url(r.metrics_url), "Embed", "OK") for r in pool]
        calls = 300
        for i in range(calls):
            client.embed([f"query {i}"])
        counts = [
            handled(scrape_url(r.metrics_url), "Embed", "OK") - b
            for r, b in zip(pool, before, strict=True)
        ]
        assert sum(counts) == calls
        mean = calls / len(pool)
        assert all(abs(c - mean) <= 0.2 * mean for c in counts), counts

        # One replica gone: unary calls keep working (retried on the next replica).
        pool[0].kill()
        for i in range(30):
            client.embed([f"after kill {i}"])

        for replica in pool:
            replica.kill()
        started = time.monotonic()
        with pytest.raises(EmbedClientError) as unary:
            client.embed(["nobody home"], timeout=10)
        assert unary.value.code == grpc.StatusCode.UNAVAILABLE, unary.value
        with pytest.raises(EmbedClientError) as stream:
            list(client.embed_stream([("a", "nobody home")]))
        assert stream.value.code == grpc.StatusCode.UNAVAILABLE, stream.value
        assert "no replica answered" in stream.value.message
        assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_20000_item_stream_survives_a_killed_and_a_draining_replica(
    pool: list[Replica],
) -> None:
    expected = reference(pool[2].address)
    items = ((f"doc-{i}", text_of(i)) for i in range(N_ITEMS))
    worst = 0.0
    seen = 0
    started = time.monotonic()
    with EmbedClient([r.address for r in pool], timeout=30) as client:
        # Connections to all three up (as a database's queries would have them), so that
        # round_robin puts the three sub-streams on three replicas.
        for _ in range(9):
            client.embed(["warm up"])
        for result in client.embed_stream(items):
            assert result.id == f"doc-{seen}", "answers out of order or duplicated"
            assert result.error is None, result.error
            assert result.vector is not None
            worst = max(worst, float(np.abs(result.vector - expected[seen % DISTINCT]).max()))
            seen += 1
            if seen == N_ITEMS // 4:
                killed = streaming(pool)[0]
                killed.kill()  # kill -9 mid-stream
            elif seen == N_ITEMS // 2:
                draining = next(r for r in pool if r is not killed)
                draining.terminate()  # SIGTERM: drains
        counters = client.counters.snapshot()
    elapsed = time.monotonic() - started
    print(f"pool stream: {N_ITEMS} items in {elapsed:.1f}s, {counters}, max abs diff {worst:.2e}")
    assert seen == N_ITEMS, "every item answered exactly once"
    assert worst <= 1e-6, worst
    assert counters["streams_broken"] >= 1
    assert counters["resent_items"] >= 1
    assert draining.proc.wait(30) == 0, draining.log()  # the draining replica exited cleanly


@pytest.mark.slow
def test_the_async_client_fails_over_as_the_blocking_one(pool: list[Replica]) -> None:
    """AsyncEmbedClient on a pool: async items, a replica killed mid-stream, every item once,
    in order, with the single-server vector."""
    import asyncio

    from akidb_embed_client import AsyncEmbedClient

    n = 12_000
    expected = reference(pool[2].address)

    async def items() -> AsyncIterator[tuple[str, str]]:
        for i in range(n):
            yield f"doc-{i}", text_of(i)

    async def main() -> tuple[int, float, dict[str, int]]:
        seen, worst = 0, 0.0
        async with AsyncEmbedClient([r.address for r in pool], timeout=30) as client:
            for _ in range(9):
                await client.embed(["warm up"])
            async for result in client.embed_stream(items()):
                assert result.id == f"doc-{seen}", "answers out of order or duplicated"
                assert result.error is None and result.vector is not None, result.error
                worst = max(worst, float(np.abs(result.vector - expected[seen % DISTINCT]).max()))
                seen += 1
                if seen == 1_000:
                    streaming(pool)[0].kill()
            return seen, worst, client.counters.snapshot()

    seen, worst, counters = asyncio.run(main())
    print(f"async pool stream: {seen} items, {counters}, max abs diff {worst:.2e}")
    assert seen == n and worst <= 1e-6
    assert counters["streams_broken"] >= 1 and counters["resent_items"] >= 1
