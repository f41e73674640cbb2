"""The compute thread: token-budget batches, lanes, cancellation, results to the right caller."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from akidb_embed.batching import ComputeWorker, plan_batches


class RecordingModel:
    """Returns each row's first id and length; records batches; can block on a gate."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append([ids[0] for ids in batch])
        return np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32)


def test_plan_batches_respects_the_padded_token_budget() -> None:
    lengths = [5, 100, 7, 98, 6, 50, 3]
    batches = plan_batches(lengths, max_batch_tokens=200, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 200
    # Sorted by length: the two long texts share a batch, short ones are not padded to 100.
    assert batches[0] == [1, 3]


def test_an_item_longer_than_the_budget_gets_its_own_batch() -> None:
    assert plan_batches([500, 3], max_batch_tokens=100, max_batch_size=8) == [[0], [1]]


@pytest.fixture()
def worker() -> ComputeWorker:
    w = ComputeWorker(max_batch_tokens=64, max_batch_size=4)
    w.start()
    yield w
    w.stop(10)


def test_each_caller_gets_its_own_vector(worker: ComputeWorker) -> None:
    model = RecordingModel()
    futures = [worker.submit(model, [i] * (1 + i % 5)) for i in range(20)]
    results = [f.result(10) for f in futures]
    assert [(int(r[0]), int(r[1])) for r in results] == [(i, 1 + i % 5) for i in range(20)]
    assert all(len(b) <= 4 for b in model.batches)


def test_interactive_lane_goes_before_the_bulk_backlog(worker: ComputeWorker) -> None:
    model = RecordingModel()
    model.gate.clear()
    first = worker.submit(model, [0])  # occupies the thread
    assert model.entered.wait(5)
    bulk = [worker.submit(model, [100 + i]) for i in range(12)]
    query = worker.submit(model, [7], interactive=True)
    model.gate.set()
    query.result(10)
    for f in [first, *bulk]:
        f.result(10)
    assert model.batches[0] == [0]
    assert model.batches[1] == [7]  # the query ran right after the batch in progress


def test_cancelled_items_cost_no_compute(worker: ComputeWorker) -> None:
    model = RecordingModel()
    model.gate.clear()
    worker.submit(model, [0])
    assert model.entered.wait(5)
    doomed = [worker.submit(model, [500 + i]) for i in range(6)]
    kept = worker.submit(model, [9])
    for f in doomed:
        assert f.cancel()
    model.gate.set()
    assert int(kept.result(10)[0]) == 9
    ran = {i for b in model.batches for i in b}
    assert not ran & {500 + i for i in range(6)}
    assert worker.queued_tokens == 0


def test_forward_errors_reach_every_caller_of_the_batch(worker: ComputeWorker) -> None:
    class Broken(RecordingModel):
        def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
            raise RuntimeError("boom")

    futures = [worker.submit(Broken(), [1]) for _ in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(10)
    # The thread survives.
    assert int(worker.submit(RecordingModel(), [4]).result(10)[0]) == 4


def test_jobs_run_on_the_compute_thread(worker: ComputeWorker) -> None:
    assert worker.call(lambda: threading.current_thread().name).result(10) == "mlx-compute"
