"""The compute thread: token-budget batches, lanes, cancellation, results to the right caller."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import numpy as np
import pytest

from akidb_embed.errors import Unavailable
from akidb_embed.modeling.tokenization import pack
from akidb_embed.runtime.batching import GroupOutput, Scheduler, plan_batches


def vector(future: Future[GroupOutput], timeout: float = 10) -> np.ndarray:
    """The one row of a single-text group, or its error raised."""
    output = future.result(timeout)
    if output.errors:
        raise output.errors[0]
    return output.vectors[0]


class RecordingModel:
    """Returns each row's first id and length; records batches; can block on a gate."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
        self.batches.append([int(ids[s]) for s in starts])
        return np.array(
            [[ids[s], n] for s, n in zip(starts, lengths, strict=True)], dtype=np.float32
        )


def test_plan_batches_respects_the_padded_token_budget() -> None:
    lengths = [5, 100, 7, 98, 6, 50, 3]
    batches = plan_batches(lengths, max_batch_tokens=200, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 200
    # Sorted by length: the two long texts share a batch, short ones are not padded to 100.
    assert batches[0] == [1, 3]


def test_short_texts_are_not_padded_into_a_long_batch() -> None:
    lengths = [120, 8, 7, 9, 118, 6, 5, 8]
    batches = plan_batches(lengths, max_batch_tokens=10_000, max_batch_size=64)
    assert batches[0][:2] == [0, 4]
    assert len(batches) == 2  # not one batch padded to 120, not one batch per text
    for batch in batches:
        real = sum(lengths[i] for i in batch)
        assert len(batch) * max(lengths[i] for i in batch) <= 1.5 * real


def test_an_item_longer_than_the_budget_gets_its_own_batch() -> None:
    assert plan_batches([500, 3], max_batch_tokens=100, max_batch_size=8) == [[0], [1]]


@pytest.fixture()
def worker() -> Iterator[Scheduler]:
    w = Scheduler(max_batch_tokens=64, max_batch_size=4)
    w.start()
    yield w
    w.stop(10)


def test_each_caller_gets_its_own_vector(worker: Scheduler) -> None:
    model = RecordingModel()
    futures = [worker.submit(model, [i] * (1 + i % 5)) for i in range(20)]
    results = [vector(f) for f in futures]
    assert [(int(r[0]), int(r[1])) for r in results] == [(i, 1 + i % 5) for i in range(20)]
    assert all(len(b) <= 4 for b in model.batches)


def test_interactive_lane_goes_before_the_bulk_backlog(worker: Scheduler) -> None:
    model = RecordingModel()
    model.gate.clear()
    first = worker.submit(model, [0])  # occupies the thread
    assert model.entered.wait(5)
    bulk = [worker.submit(model, [100 + i]) for i in range(12)]
    query = worker.submit(model, [7], interactive=True)
    model.gate.set()
    vector(query)
    for f in [first, *bulk]:
        vector(f)
    assert model.batches[0] == [0]
    assert model.batches[1] == [7]  # the query ran right after the batch in progress


def test_cancelled_items_cost_no_compute(worker: Scheduler) -> None:
    model = RecordingModel()
    model.gate.clear()
    worker.submit(model, [0])
    assert model.entered.wait(5)
    doomed = [worker.submit(model, [500 + i]) for i in range(6)]
    kept = worker.submit(model, [9])
    for f in doomed:
        assert f.cancel()
    model.gate.set()
    assert int(vector(kept)[0]) == 9
    ran = {i for b in model.batches for i in b}
    assert not ran & {500 + i for i in range(6)}
    assert worker.queued_tokens == 0


def test_forward_errors_reach_every_caller_of_the_batch(worker: Scheduler) -> None:
    class Broken(RecordingModel):
        def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

    futures = [worker.submit(Broken(), [1]) for _ in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            vector(f)
    # The thread survives.
    assert int(vector(worker.submit(RecordingModel(), [4]))[0]) == 4


def test_jobs_run_on_the_scheduler_thread(worker: Scheduler) -> None:
    assert worker.call(lambda: threading.current_thread().name).result(10) == "scheduler"


def submit_rows(worker: Scheduler, model: object, rows: Sequence[Sequence[int]],
                interactive: bool = False) -> Future[GroupOutput]:  # fmt: skip
    packed = pack(rows)
    return worker.submit_group(model, packed.ids, packed.offsets, interactive)  # type: ignore[arg-type]


def test_a_group_spans_batches_and_comes_back_whole_in_order(worker: Scheduler) -> None:
    model = RecordingModel()
    rows = [[i] * (1 + i % 7) for i in range(30)]  # 30 texts: several 4-row batches
    output = submit_rows(worker, model, rows).result(10)
    assert not output.errors
    assert output.vectors.shape == (30, 2)
    assert [(int(a), int(b)) for a, b in output.vectors] == [(i, 1 + i % 7) for i in range(30)]
    assert len(model.batches) >= 8  # 4 rows per batch at most
    assert worker.queued_tokens == 0 and worker.queued_items == 0


def test_groups_share_batches() -> None:
    worker = Scheduler(max_batch_tokens=64, max_batch_size=16)
    model = RecordingModel()
    model.gate.clear()
    worker.start()
    try:
        first = worker.submit(model, [0])
        assert model.entered.wait(5)
        groups = [submit_rows(worker, model, [[10 * g + i] for i in range(3)]) for g in range(4)]
        model.gate.set()
        outputs = [g.result(10) for g in groups]
        vector(first)
    finally:
        worker.stop(10)
    assert [[int(v[0]) for v in o.vectors] for o in outputs] == [
        [10 * g + i for i in range(3)] for g in range(4)
    ]
    assert len(model.batches) == 2  # the first, then all four groups in one batch


def test_an_error_fails_only_the_rows_of_its_batch(worker: Scheduler) -> None:
    class FailsOnSeven(RecordingModel):
        def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            if 7 in ids.tolist():
                raise RuntimeError("row seven")
            return super().forward_packed(ids, lengths)

    rows = [[i, 1] for i in range(12)]  # 2 tokens each: 4 rows per batch, 3 batches
    output = submit_rows(worker, FailsOnSeven(), rows).result(10)
    assert sorted(output.errors) == [4, 5, 6, 7]  # the batch that held 7
    assert [int(output.vectors[i][0]) for i in (0, 3, 8, 11)] == [0, 3, 8, 11]


def test_cancelling_a_group_midway_drops_its_remaining_rows() -> None:
    worker = Scheduler(max_batch_tokens=8, max_batch_size=1)
    model = RecordingModel()
    model.gate.clear()
    worker.start()
    try:
        doomed = submit_rows(worker, model, [[100 + i] for i in range(20)])
        assert model.entered.wait(5)
        assert doomed.cancel()
        kept = worker.submit(model, [5])
        model.gate.set()
        assert int(vector(kept)[0]) == 5
    finally:
        worker.stop(10)
    ran = [i for b in model.batches for i in b]
    assert len([i for i in ran if i >= 100]) <= 2  # the batch in progress, maybe one planned


def test_a_trickle_of_bulk_texts_fills_batches_for_the_fill_window() -> None:
    model = RecordingModel()

    def run(fill: float) -> int:
        model.batches.clear()
        worker = Scheduler(max_batch_tokens=64, max_batch_size=64, bulk_fill_seconds=fill)
        worker.start()
        try:
            futures = []
            for i in range(20):  # one text every 0.5 ms
                futures.append(worker.submit(model, [i]))
                time.sleep(0.0005)
            for f in futures:
                vector(f)
        finally:
            worker.stop(10)
        return len(model.batches)

    trickled, filled = run(0.0), run(0.05)
    assert filled <= 3 < trickled, (filled, trickled)


def test_queries_never_wait_for_the_fill_window() -> None:
    worker = Scheduler(max_batch_tokens=64, max_batch_size=64, bulk_fill_seconds=5.0)
    worker.start()
    try:
        started = time.monotonic()
        vector(worker.submit(RecordingModel(), [1], interactive=True))
        assert time.monotonic() - started < 1.0
    finally:
        worker.stop(10)


def test_bulk_batches_shrink_to_the_time_budget_while_queries_arrive() -> None:
    class Timed(RecordingModel):
        def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            time.sleep(0.0002 * len(lengths) * max(lengths))  # 5,000 padded tokens/s
            return super().forward_packed(ids, lengths)

    model = Timed()
    worker = Scheduler(max_batch_tokens=512, max_batch_size=64, bulk_batch_seconds=0.008)
    worker.start()
    try:
        vector(worker.submit(model, [1] * 32))  # teaches it the speed
        output = submit_rows(worker, model, [[i] * 8 for i in range(64)]).result(30)
        assert not output.errors
        alone = [len(b) for b in model.batches[1:]]
        model.batches.clear()
        vector(worker.submit(model, [2], interactive=True))
        output = submit_rows(worker, model, [[i] * 8 for i in range(64)]).result(30)
        with_queries = [len(b) for b in model.batches[1:]]
    finally:
        worker.stop(10)
    assert max(alone) == 64  # no queries: the whole token budget
    # Queries about: 8 ms at 5,000 tokens/s is 40 tokens, raised to the 64-token floor.
    assert max(with_queries) == 64 // 8


def test_a_scheduler_left_running_is_stopped_at_exit_dropping_its_queue() -> None:
    scheduler = Scheduler(max_batch_tokens=64, max_batch_size=4)
    scheduler.start()
    model = RecordingModel()
    model.gate.clear()
    running = scheduler.submit(model, [1, 2])
    assert model.entered.wait(10)
    queued = scheduler.submit(model, [3, 4])
    job = scheduler.call(lambda: 1)
    stopper = threading.Thread(target=scheduler.stop, kwargs={"drop_queued": True})
    stopper.start()
    time.sleep(0.1)
    model.gate.set()  # the batch in progress finishes; nothing after it starts
    stopper.join(10)
    assert not scheduler._thread.is_alive()
    assert vector(running).tolist() == [1.0, 2.0]
    with pytest.raises(Unavailable, match="exiting"):
        vector(queued)
    with pytest.raises(Unavailable):
        job.result(1)
    assert model.batches == [[1]]


# Computes on the scheduler thread, then exits without stopping it: the thread is still
# in MLX (or wakes in it) while the interpreter finalizes.
LEFT_RUNNING = """
import time
import mlx.core as mx
from akidb_embed.runtime.batching import Scheduler

def busy():
    a = mx.ones((192, 192)) / 192
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        a = a @ a
        mx.eval(a)

scheduler = Scheduler()
scheduler.start()
scheduler.call(busy).result()
scheduler.call(busy)
time.sleep(0.05)
"""


def test_a_process_that_never_stopped_its_scheduler_exits_cleanly() -> None:
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", LEFT_RUNNING], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
