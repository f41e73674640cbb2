"""The compute thread with engine worker processes (a fake pool here: threads)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pytest

from akidb_embed.runtime.batching import GroupOutput, Scheduler


def vector(future: Future[GroupOutput], timeout: float = 10) -> np.ndarray:
    output = future.result(timeout)
    if output.errors:
        raise output.errors[0]
    return output.vectors[0]


def unpack(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    return [ids[s : s + n].tolist() for s, n in zip(starts, lengths, strict=True)]


class Model:
    name = "m"

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        raise AssertionError("with a pool, batches go to the pool")


class FakePool:
    """`processes` threads that take batches as the real pool's processes do: a query first,
    bulk work on a query process only while no bulk process is ready, a batch that nobody
    wants any more skipped. Records each batch as a process starts it, and the most running
    at once; `gate` can hold them."""

    def __init__(self, processes: int = 2, query_processes: int = 0) -> None:
        self.processes = processes + query_processes
        self.ready_count = processes + query_processes
        self.bulk_capacity = processes
        self.ready_query_processes = query_processes
        self.interactive: list[bool] = []
        self.batches: list[list[int]] = []
        self.submitted = 0
        self.submitting_threads: list[str] = []
        self.running = 0
        self.most_running = 0
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self._cond = threading.Condition()
        self._queries: deque[tuple[list[list[int]], Future[np.ndarray], object]] = deque()
        self._bulk: deque[tuple[list[list[int]], Future[np.ndarray], object]] = deque()
        for index in range(self.processes):
            threading.Thread(target=self._process, args=(index >= processes,), daemon=True).start()

    def on_capacity_change(self, listener: object) -> None:
        pass

    def submit(
        self,
        model: str,
        ids: np.ndarray,
        lengths: np.ndarray,
        interactive: bool = False,
        wanted: object = None,
    ) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        with self._cond:
            self.submitted += 1
            self.submitting_threads.append(threading.current_thread().name)
            lane = self._queries if interactive else self._bulk
            lane.append((unpack(ids, lengths), future, wanted))
            self._cond.notify_all()
        return future

    def _process(self, for_queries: bool) -> None:
        while True:
            with self._cond:
                while not self._queries and (for_queries or not self._bulk):
                    self._cond.wait()
                interactive = bool(self._queries)
                batch, future, wanted = (self._queries or self._bulk).popleft()
                if callable(wanted) and not wanted():
                    skip = True
                else:
                    skip = False
                    self.interactive.append(interactive)
                    self.batches.append([ids[0] for ids in batch])
                    self.running += 1
                    self.most_running = max(self.most_running, self.running)
            if skip:
                future.cancel()
                continue
            self.started.set()
            self.gate.wait(10)
            time.sleep(0.002)  # a forward takes time: another process takes the next batch
            with self._cond:
                self.running -= 1
            future.set_result(np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32))


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def worker(pool: FakePool, tokens: int = 64) -> Scheduler:
    compute = Scheduler(max_batch_tokens=tokens, max_batch_size=8, pool=pool)  # type: ignore[arg-type]
    compute.start()
    return compute


def test_every_item_gets_its_own_vector_and_processes_stay_busy_not_flooded() -> None:
    pool = FakePool(processes=2)
    compute = worker(pool)
    rng = np.random.default_rng(0)
    items = [[i, *([7] * int(rng.integers(0, 30)))] for i in range(200)]
    futures = [compute.submit(Model(), ids) for ids in items]
    for ids, future in zip(items, futures, strict=True):
        np.testing.assert_array_equal(vector(future), [ids[0], len(ids)])
    compute.stop(10)
    assert pool.most_running <= pool.processes
    assert pool.most_running == pool.processes  # both were used


def test_bulk_windows_sort_by_length_across_batches() -> None:
    pool = FakePool(processes=1)
    pool.gate.clear()
    compute = worker(pool, tokens=64)
    # One holds the only process, one waits in the pool: the texts then queue here.
    blockers = [compute.submit(Model(), [999])]
    assert pool.started.wait(10)
    blockers.append(compute.submit(Model(), [998, 7, 7]))
    wait_for(lambda: pool.submitted == 2)
    lengths = [2, 30, 3, 31, 2, 29, 3, 30]
    futures = [compute.submit(Model(), [i, *([7] * (n - 1))]) for i, n in enumerate(lengths)]
    pool.gate.set()
    for future in [*blockers, *futures]:
        vector(future)
    compute.stop(10)
    # Long texts share batches, short ones share others: nothing short padded to 30.
    assert [b[0] for b in pool.batches[:2]] == [999, 998]
    for batch in pool.batches[2:]:
        assert len({lengths[i] >= 29 for i in batch}) == 1, pool.batches


def test_the_next_bulk_batch_waits_in_the_pool_not_here() -> None:
    """A process that finishes a batch finds the next one waiting in the pool; one, no more,
    so what stays here can still be sorted and a query still goes first."""
    pool = FakePool(processes=1)
    pool.gate.clear()
    compute = worker(pool, tokens=16)
    bulk = [compute.submit(Model(), [i, *([7] * 10)]) for i in range(6)]
    wait_for(lambda: pool.submitted == 2)
    time.sleep(0.1)  # room for a third to be handed over, if the scheduler allowed one
    assert pool.submitted == 2 and pool.running == 1
    # What waits here, queued or planned into batches, counts against the queue's limit.
    assert compute.queued_tokens == 4 * 11 and compute.queued_items == 4
    pool.gate.set()
    for future in bulk:
        vector(future)
    compute.stop(10)
    assert sorted(ids for batch in pool.batches for ids in batch) == list(range(6))


def test_a_query_goes_before_planned_bulk_batches() -> None:
    pool = FakePool(processes=1)
    pool.gate.clear()
    compute = worker(pool, tokens=16)
    first = compute.submit(Model(), [1000])
    assert pool.started.wait(10)
    bulk = [compute.submit(Model(), [i, *([7] * 10)]) for i in range(20)]
    query = compute.submit(Model(), [5000], interactive=True)
    pool.gate.set()
    vector(query)
    for future in [first, *bulk]:
        vector(future)
    compute.stop(10)
    order = [ids for batch in pool.batches for ids in batch]
    # Only what was already running (and at most the batch being started) precedes it.
    assert order.index(5000) <= 2, pool.batches


def test_bulk_work_leaves_the_query_process_free() -> None:
    """One bulk process and one kept for queries: bulk batches go one at a time although two
    processes are ready, and a query starts at once, beside the bulk batch in progress."""
    pool = FakePool(processes=1, query_processes=1)
    pool.gate.clear()
    compute = worker(pool, tokens=16)
    bulk = [compute.submit(Model(), [i, *([7] * 10)]) for i in range(10)]
    assert pool.started.wait(10)
    time.sleep(0.1)  # room for a second bulk batch to start, if the scheduler allowed one
    assert pool.running == 1, pool.batches
    query = compute.submit(Model(), [5000], interactive=True)
    deadline = time.monotonic() + 10
    while pool.running < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pool.running == 2 and pool.batches[-1] == [5000], pool.batches
    assert pool.interactive == [False, True]
    pool.gate.set()
    vector(query)
    for future in bulk:
        vector(future)
    compute.stop(10)
    assert pool.most_running == 2


def test_a_caller_that_gives_up_while_planned_costs_no_compute() -> None:
    pool = FakePool(processes=1)
    pool.gate.clear()
    compute = worker(pool)
    first = compute.submit(Model(), [1000])
    assert pool.started.wait(10)
    doomed = [compute.submit(Model(), [i, 7]) for i in range(5)]
    wait_for(lambda: pool.submitted == 2)  # some of them wait in the pool, the rest here
    kept = compute.submit(Model(), [77, 7])
    for future in doomed:
        assert future.cancel()
    pool.gate.set()
    vector(first)
    np.testing.assert_array_equal(vector(kept), [77, 2])
    compute.stop(10)
    assert not {0, 1, 2, 3, 4} & {ids for batch in pool.batches for ids in batch}


def test_stop_finishes_what_is_queued() -> None:
    pool = FakePool(processes=2)
    compute = worker(pool)
    futures = [compute.submit(Model(), [i, 1, 2]) for i in range(50)]
    compute.stop(10)
    assert all(f.done() and not f.result().errors for f in futures)


def test_a_failed_batch_fails_only_its_items() -> None:
    class FailingPool(FakePool):
        def submit(
            self,
            model: str,
            ids: np.ndarray,
            lengths: np.ndarray,
            interactive: bool = False,
            wanted: object = None,
        ) -> Future[np.ndarray]:
            if any(row[0] == 13 for row in unpack(ids, lengths)):
                future: Future[np.ndarray] = Future()
                future.set_exception(RuntimeError("worker said no"))
                return future
            return super().submit(model, ids, lengths, interactive, wanted)

    compute = Scheduler(max_batch_tokens=4, max_batch_size=1, pool=FailingPool())  # type: ignore[arg-type]
    compute.start()
    bad, good = compute.submit(Model(), [13]), compute.submit(Model(), [14])
    with pytest.raises(RuntimeError, match="worker said no"):
        vector(bad)
    np.testing.assert_array_equal(vector(good), [14, 1])
    compute.stop(10)


@pytest.mark.parametrize("query_processes", [0, 1])
def test_bulk_batches_are_cut_for_queries_only_without_a_query_process(
    query_processes: int,
) -> None:
    """While queries come, a bulk batch is cut to the time budget so that a query waits
    little for it; a process kept for queries means no query waits for one: no cut."""
    pool = FakePool(processes=2, query_processes=query_processes)
    compute = Scheduler(
        max_batch_tokens=512, max_batch_size=64, pool=pool, bulk_batch_seconds=0.025
    )  # type: ignore[arg-type]
    compute.start()
    compute._speed["m"] = 10_000.0  # padded tokens/s: 25 ms is 250 tokens
    now = time.monotonic()
    assert compute._bulk_batch_tokens("m", now) == 512  # no query lately
    compute.submit(Model(), [1, 2, 3], interactive=True).result(10)
    compute._speed["m"] = 10_000.0
    expected = 512 if query_processes else 250
    assert compute._bulk_batch_tokens("m", time.monotonic()) == expected
    compute.stop(10)


def test_a_query_with_a_free_process_goes_to_the_pool_from_the_callers_thread() -> None:
    """No wake-up of the scheduler thread on an idle query's way; queries that find every
    process busy with queries wait in the scheduler's lane and keep their order."""
    pool = FakePool(processes=1)
    compute = worker(pool)
    try:
        caller = threading.current_thread().name
        assert vector(compute.submit(Model(), [5, 6, 7], interactive=True)).tolist() == [5, 3]
        assert pool.submitting_threads == [caller]
        pool.gate.clear()  # the one process holds the next query
        held = compute.submit(Model(), [8], interactive=True)
        wait_for(lambda: pool.running == 1)
        later = [compute.submit(Model(), [9 + i], interactive=True) for i in range(3)]
        time.sleep(0.05)
        assert pool.submitting_threads == [caller, caller]  # the later ones wait in the lane
        pool.gate.set()
        assert [vector(f)[0] for f in [held, *later]] == [8, 9, 10, 11]
        assert pool.submitting_threads[2:] == ["scheduler"] * (len(pool.submitting_threads) - 2)
        assert pool.batches == [[5], [8], [9, 10, 11]]  # the waiting queries as one batch
        bulk = compute.submit(Model(), [4, 4])  # bulk work never takes the direct way
        assert vector(bulk).tolist() == [4, 2]
        assert pool.submitting_threads[-1] == "scheduler"
    finally:
        compute.stop(5)
