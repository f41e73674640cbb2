"""The compute thread: the one thread that runs all MLX work.

Callers (any thread, any event loop) submit one tokenised text at a time and get a
`concurrent.futures.Future` for its pooled vector. The thread groups pending texts per model
into batches bounded by a token budget (padded tokens = rows x longest row), sorted by length
so little compute goes to padding: bulk work is taken several batches at a time to sort.
Interactive work (a query of a few texts) has its own lane that is served before bulk work,
so a query waits for at most the batch in progress, never behind a re-index backlog. There
is no fill timer: a batch starts as soon as the thread is free, with whatever is queued. A
cancelled future (caller gone, deadline passed) leaves the queue without costing compute.
Model loads run on the same thread, between batches.

With a `WorkerPool` (workers.py), the thread hands each batch to an engine worker process
instead of running it, one batch per process, and starts the next as soon as a process is
free: N cores stay busy, and a query still waits for at most the batch in progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    from .workers import WorkerPool

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchModel(Protocol):
    """What the compute thread needs of an engine."""

    name: str

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray: ...


@dataclass
class _Item:
    model: BatchModel
    ids: Sequence[int]
    future: Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """One executed batch, for metrics."""

    model: str
    rows: int
    real_tokens: int
    padded_tokens: int
    queue_seconds: float
    compute_seconds: float


# A batch is closed before padding would exceed this multiple of its real tokens: a short
# text costs more padded into a long batch than in a batch of its own.
MAX_PADDING_RATIO = 1.5


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int
) -> list[list[int]]:
    """Split item indices into batches: longest first, each within the padded-token budget
    and wasting at most a third of its compute on padding.

    A single item longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        if current:
            # Sorted descending: the first row of a batch is its longest.
            padded = (len(current) + 1) * lengths[current[0]]
            if (
                len(current) >= max_batch_size
                or padded > max_batch_tokens
                or padded > MAX_PADDING_RATIO * (real + lengths[index])
            ):
                batches.append(current)
                current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        batches.append(current)
    return batches


# A bulk window spans this many batches, so that sorting by length has something to sort
# (measured: 36% of a short-text stream's tokens were padding with one-batch windows).
# Its batches wait, planned, and start one at a time, each after the interactive lane.
BULK_WINDOW_BATCHES = 8


class ComputeWorker:
    def __init__(
        self,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch
        self.pool = pool
        # Batches handed to the pool and not finished: one per process, so a query waits for
        # at most the batch in progress (the next is chosen only when a process is free).
        self._in_flight = 0
        self._max_in_flight = pool.processes if pool is not None else 0
        self._cond = threading.Condition()
        # Per lane, per model: FIFO queues. Interactive is always served first.
        self._interactive: dict[str, deque[_Item]] = {}
        self._bulk: dict[str, deque[_Item]] = {}
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        # Planned bulk batches not yet started (taken from the queue, sorted by length).
        self._ready: deque[list[_Item]] = deque()
        self._queued_tokens = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mlx-compute", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_items(self) -> int:
        with self._cond:
            planned = sum(len(batch) for batch in self._ready)
            return planned + sum(len(q) for lane in self._lanes for q in lane.values())

    @property
    def _lanes(self) -> tuple[dict[str, deque[_Item]], ...]:
        return (self._interactive, self._bulk)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the compute thread (model loads, warm-up)."""
        future: Future[T] = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def submit(
        self, model: BatchModel, ids: Sequence[int], interactive: bool = False
    ) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        lane = self._interactive if interactive else self._bulk
        with self._cond:
            lane.setdefault(model.name, deque()).append(_Item(model, ids, future))
            self._queued_tokens += len(ids)
            self._cond.notify()
        return future

    def _take_from(self, queues: dict[str, deque[_Item]], batches: int) -> list[_Item]:
        """(lock held) Pop the oldest items of the next model, up to `batches` batches' worth.

        Items are marked running only when their batch starts, so a caller that gives up
        while its item waits in a planned batch still costs no compute."""
        for name in list(queues):
            queue = queues[name]
            if not queue:
                continue
            # Round-robin across models: move this one to the back.
            queues[name] = queues.pop(name)
            window: list[_Item] = []
            tokens = 0
            while (
                queue
                and tokens < batches * self.max_batch_tokens
                and len(window) < batches * self.max_batch_size
            ):
                item = queue.popleft()
                self._queued_tokens -= len(item.ids)
                if not item.future.cancelled():
                    window.append(item)
                    tokens += len(item.ids)
            return window
        return []

    def _plan(self, window: list[_Item]) -> list[list[_Item]]:
        lengths = [len(item.ids) for item in window]
        plan = plan_batches(lengths, self.max_batch_tokens, self.max_batch_size)
        return [[window[i] for i in indices] for indices in plan]

    def _next_batch(self) -> list[_Item]:
        """(lock held) The interactive lane first; then the planned bulk batches; then plan
        a new bulk window."""
        window = self._take_from(self._interactive, 1)
        if window:
            first, *rest = self._plan(window)
            self._ready.extendleft(reversed(rest))
            return first
        if not self._ready:
            self._ready.extend(self._plan(self._take_from(self._bulk, BULK_WINDOW_BATCHES)))
        return self._ready.popleft() if self._ready else []

    def _has_items(self) -> bool:
        return bool(self._ready) or any(q for lane in self._lanes for q in lane.values())

    def _pool_full(self) -> bool:
        return self.pool is not None and self._in_flight >= self._max_in_flight

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and (
                    (self._has_items() and self._pool_full())
                    or (not self._has_items() and not self._stopping)
                ):
                    self._cond.wait()
                job: tuple[Callable[[], Any], Future[Any]] | None = None
                batch: list[_Item] = []
                if self._jobs:
                    job = self._jobs.popleft()
                elif self._has_items():
                    batch = self._next_batch()
                else:  # stopping, and nothing left to start
                    while self._in_flight:  # let the pool's batches finish
                        self._cond.wait()
                    return
            if job is not None:
                self._run_job(*job)
                continue
            # Callers that gave up while the batch was planned leave it here.
            items = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if items:
                self._run_batch(items)

    @staticmethod
    def _run_job(fn: Callable[[], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _run_batch(self, items: list[_Item]) -> None:
        if self.pool is not None:
            self._dispatch(self.pool, items)
            return
        started = time.monotonic()
        try:
            vectors = items[0].model.forward([item.ids for item in items])
        except Exception as exc:
            self._fail(items, exc)
            return
        self._finish(items, vectors, started)

    def _dispatch(self, pool: WorkerPool, items: list[_Item]) -> None:
        """Hand a batch to a worker process; its results arrive on the pool's thread."""
        with self._cond:
            self._in_flight += 1
        started = time.monotonic()
        future = pool.submit(items[0].model.name, [item.ids for item in items])

        def done(future: Future[np.ndarray]) -> None:
            try:
                error = future.exception()
                if error is None:
                    self._finish(items, future.result(), started)
                else:
                    self._fail(items, error)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

        future.add_done_callback(done)

    @staticmethod
    def _fail(items: list[_Item], exc: BaseException) -> None:
        log.error("batch of %d on %s failed", len(items), items[0].model.name, exc_info=exc)
        for item in items:
            item.future.set_exception(exc)

    def _finish(self, items: list[_Item], vectors: np.ndarray, started: float) -> None:
        for item, vector in zip(items, vectors, strict=True):
            item.future.set_result(vector)
        if self._on_batch is not None:
            done = time.monotonic()
            self._on_batch(
                BatchStats(
                    model=items[0].model.name,
                    rows=len(items),
                    real_tokens=sum(len(i.ids) for i in items),
                    padded_tokens=len(items) * max(len(i.ids) for i in items),
                    queue_seconds=started - min(i.enqueued_at for i in items),
                    compute_seconds=done - started,
                )
            )
