"""Engine worker processes that die or hang under a running stream, against the real server.

Every accepted item gets its vector exactly once, in order, with no error; the server keeps
serving (at reduced capacity while a worker is replaced); only a batch that kills workers
twice fails, alone, with a message that says so.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from akidb_embed.runtime.workers import FAULT_TOKEN_ENV
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.corpus import docstring_sentences
from tests.ops.conftest import ServerProcess, scrape_url, value

ITEMS = 5000
# Fault injection: the worker processes of these servers exit on any batch holding this
# token, "##zoo" in all-MiniLM-L6-v2's vocabulary ("kazoo" -> ka ##zoo); no test text has it.
POISON_TOKEN = 23221
POISON_TEXT = "a kazoo"


def worker_pids(server: ServerProcess) -> list[int]:
    children = psutil.Process(server.proc.pid).children()
    return sorted(p.pid for p in children if "spawn_main" in " ".join(p.cmdline()))


@pytest.fixture()
def workers_server(tmp_path: Path) -> Iterator[ServerProcess]:
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    server = ServerProcess(
        socket_dir / "embed.sock",
        tmp_path / "server.log",
        "--workers",
        "2",
        "--query-workers",  # two processes, as the counts below say
        "0",
        "--batch-timeout",
        "3",
        env={FAULT_TOKEN_ENV: str(POISON_TOKEN)},
    ).wait_serving()
    yield server
    server.close()


def texts_for(count: int) -> list[str]:
    pool = docstring_sentences(500)
    return [f"{pool[i % len(pool)]} {i}" for i in range(count)]


def stream_with_fault(server: ServerProcess, fault: object) -> tuple[list[str], np.ndarray, float]:
    """Stream ITEMS texts; call `fault()` once a fifth are answered. Returns the answered
    ids, their vectors, and the seconds from the fault to the last answer."""
    texts = texts_for(ITEMS)
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    faulted_at = 0.0
    with EmbedClient(server.target, timeout=60) as client:
        stream = client.embed_stream(((f"item-{i}", t) for i, t in enumerate(texts)), timeout=300)
        for result in stream:
            assert result.error is None, (result.id, result.error)
            assert result.vector is not None
            ids.append(result.id)
            vectors.append(result.vector)
            if len(ids) == ITEMS // 5:
                fault()  # type: ignore[operator]
                faulted_at = time.monotonic()
    return ids, np.stack(vectors), time.monotonic() - faulted_at


def check_all_answered(server: ServerProcess, ids: list[str], vectors: np.ndarray) -> None:
    assert ids == [f"item-{i}" for i in range(ITEMS)]  # once each, in order
    sample = [0, ITEMS // 5, ITEMS // 5 + 1, ITEMS // 2, ITEMS - 1]
    with EmbedClient(server.target, timeout=60) as client:
        expected = client.embed([texts_for(ITEMS)[i] for i in sample]).vectors
    np.testing.assert_allclose(vectors[sample], expected, atol=1e-4)


def wait_for_capacity(server: ServerProcess, ready: int, timeout: float) -> float:
    started = time.monotonic()
    with EmbedClient(server.target, timeout=5) as client:
        while time.monotonic() - started < timeout:
            if client.health().workers_ready == ready:
                return time.monotonic() - started
            time.sleep(0.05)
    raise AssertionError(f"{ready} workers not ready after {timeout}s:\n{server.log()}")


def test_kill_9_of_a_worker_mid_stream_loses_nothing(workers_server: ServerProcess) -> None:
    victim = worker_pids(workers_server)[0]
    health_during: list[str] = []
    recovered: list[float] = []

    def kill() -> None:
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()

        def watch() -> None:  # one worker gone: still SERVING; then back to 2 ready
            with EmbedClient(workers_server.target, timeout=5) as client:
                seen_gone = False
                while time.monotonic() - killed < 60:
                    ready = client.health().workers_ready
                    if ready < 2 and not seen_gone:
                        seen_gone = True
                        health_during.append(client.check())
                    if seen_gone and ready == 2:
                        recovered.append(time.monotonic() - killed)
                        return
                    time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    ids, vectors, _ = stream_with_fault(workers_server, kill)
    check_all_answered(workers_server, ids, vectors)
    wait_for_capacity(workers_server, 2, 60)
    print(f"\nkill -9: {ITEMS} items answered once each; 2 workers ready {recovered[0]:.1f}s after")
    assert health_during == ["SERVING"]
    # A replacement is computing again within seconds (docs/performance.md has the figure).
    assert recovered and recovered[0] < 15, recovered
    samples = scrape_url(workers_server.metrics_url)
    assert value(samples, "akidb_embed_worker_restarts_total") == 1
    assert value(samples, "akidb_embed_failed_batches_total") == 0
    assert value(samples, "akidb_embed_workers_ready") == 2
    assert victim not in worker_pids(workers_server)
    assert "killed by SIGKILL" in workers_server.log()


def test_kill_stop_of_a_worker_mid_stream_loses_nothing(workers_server: ServerProcess) -> None:
    victim = worker_pids(workers_server)[1]
    ids, vectors, seconds = stream_with_fault(
        workers_server, lambda: os.kill(victim, signal.SIGSTOP)
    )
    check_all_answered(workers_server, ids, vectors)
    wait_for_capacity(workers_server, 2, 60)
    print(f"\nkill -STOP: {ITEMS} items answered once each, {seconds:.1f}s after the stop")
    samples = scrape_url(workers_server.metrics_url)
    assert value(samples, "akidb_embed_worker_restarts_total") == 1
    assert value(samples, "akidb_embed_batch_reruns_total") >= 1
    assert "stopped answering" in workers_server.log()
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


def test_a_batch_that_always_kills_its_worker_fails_alone(workers_server: ServerProcess) -> None:
    texts = texts_for(300)
    items = [(f"item-{i}", t) for i, t in enumerate(texts)]
    items.insert(150, ("poison", POISON_TEXT))
    with EmbedClient(workers_server.target, timeout=120) as client:
        results = list(client.embed_stream(items, timeout=300))
        assert [r.id for r in results] == [item_id for item_id, _ in items]
        failed = [r for r in results if r.error is not None]
        assert [r.id for r in failed] == ["poison"]
        error = failed[0].error
        assert error is not None and error.code.name == "INTERNAL"
        assert "killed the engine twice" in error.message
        good = np.stack([r.vector for r in results if r.vector is not None])
        np.testing.assert_allclose(good[:5], client.embed(texts[:5]).vectors, atol=1e-4)
        wait_for_capacity(workers_server, 2, 60)
        assert client.check() == "SERVING"
        # A unary call that holds it fails alone too, naming what happened.
        with pytest.raises(EmbedClientError) as info:
            client.embed(["fine", POISON_TEXT])
        assert "killed the engine twice" in info.value.message
    samples = scrape_url(workers_server.metrics_url)
    assert value(samples, "akidb_embed_failed_batches_total") == 2
