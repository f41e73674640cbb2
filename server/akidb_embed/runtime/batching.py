"""The scheduler: the one thread that decides what is computed next.

Callers (any thread, any event loop) submit a whole group of tokenised texts at once (one
Embed request, one stream message) and get one `concurrent.futures.Future` for the group: a
`GroupOutput` with one float32 row per text, or the error of each row that failed. The
thread cuts the queued rows of each model into batches bounded by a token budget (padded
tokens = rows x longest row), sorted by length so little compute goes to padding: bulk work
is taken several batches at a time to sort. A group larger than a batch spans several.

Two lanes. Interactive work (a query of a few texts) is served before bulk work, so a query
waits for at most the batch in progress, never behind a re-index backlog. While queries
arrive, bulk batches are cut to a time budget (`bulk_batch_seconds`, from each model's
measured speed) so that the batch a query waits for is short; with no queries they take the
whole token budget. A bulk batch that would start small waits up to `bulk_fill_seconds` for
more rows, so a trickling stream becomes a few full batches, not hundreds of one-text ones;
queries never wait for a fill. A cancelled group (caller gone, deadline passed) leaves the
queue without costing compute. Model loads run on the same thread, between batches.

With a `WorkerPool` (workers.py), the thread hands each batch to an engine worker process
instead of running it, as many at once as there are processes ready, and starts the next as
soon as one is free. A query that finds a process free and no other query waiting skips the
thread: the caller hands it to the pool itself.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..errors import Unavailable
from ..modeling.engine import release_thread_streams
from .workers import RowFailures

if TYPE_CHECKING:
    from ..modeling.engine import NetworkFacts
    from .workers import ModelSpec, WorkerPool

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchModel(Protocol):
    """What the scheduler needs of an engine."""

    name: str

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GroupOutput:
    """The result of a group: row i of `vectors` is text i's pooled vector (native size,
    not normalised) unless `errors` has an entry for i."""

    vectors: np.ndarray
    errors: dict[int, BaseException]


@dataclass(eq=False)
class Group:
    """Texts submitted together; their rows may be computed in several batches."""

    model: BatchModel
    ids: np.ndarray  # int32, back to back
    offsets: np.ndarray  # int64, len + 1
    future: Future[GroupOutput]
    interactive: bool
    enqueued_at: float = field(default_factory=time.monotonic)
    cursor: int = 0  # rows before it have left the queue
    remaining: int = 0  # rows not yet computed or failed
    out: np.ndarray | None = None
    errors: dict[int, BaseException] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.remaining = len(self.offsets) - 1

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, start: int, stop: int) -> int:
        return int(self.offsets[stop] - self.offsets[start])

    @property
    def gone(self) -> bool:
        return self.future.done()

    def _settle(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0 and not self.future.done():
            vectors = self.out if self.out is not None else np.zeros((self.rows, 0), np.float32)
            with contextlib.suppress(InvalidStateError):  # the caller may cancel at any moment
                self.future.set_result(GroupOutput(vectors, self.errors))

    def deliver(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if self.out is None:
            self.out = np.zeros((self.rows, vectors.shape[1]), dtype=np.float32)
        self.out[rows] = vectors
        self._settle(len(rows))

    def fail(self, rows: np.ndarray, error: BaseException) -> None:
        for row in rows.tolist():
            self.errors[row] = error
        self._settle(len(rows))


@dataclass(frozen=True)
class Batch:
    """Rows of one or more groups, computed together: parts[k] = (group, its rows)."""

    model: BatchModel
    parts: list[tuple[Group, np.ndarray]]
    ids: np.ndarray
    lengths: np.ndarray
    enqueued_at: float
    interactive: bool = False

    @property
    def padded_tokens(self) -> int:
        return len(self.lengths) * int(self.lengths.max())


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
    lengths: Sequence[int] | np.ndarray, max_batch_tokens: int, max_batch_size: int
) -> list[list[int]]:
    """Split item indices into batches: longest first, each within the padded-token budget
    and wasting at most a third of its compute on padding.

    A single item longer than the budget still gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable").tolist()
    values = lengths.tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    longest = 0
    for index in order:
        length = values[index]
        if current:
            padded = (len(current) + 1) * longest
            if (
                len(current) >= max_batch_size
                or padded > max_batch_tokens
                or padded > MAX_PADDING_RATIO * (real + length)
            ):
                batches.append(current)
                current, real = [], 0
        if not current:
            longest = length  # sorted descending: the first row of a batch is its longest
        current.append(index)
        real += length
    if current:
        batches.append(current)
    return batches


# A bulk window spans this many batches, so that sorting by length has something to sort.
# Padding's share of the bench corpus's tokens by window: 1 batch 27%, 8 13%, 32 4.5%,
# 64 2.7%, the whole corpus sorted 1%. A window is ~1.6 s of MiniLM on 2 cores; its batches
# wait, planned, and start one at a time, each after the interactive lane.
BULK_WINDOW_BATCHES = 64
# Bulk batches handed to the pool beyond one per process: the next one waits there, so a
# process goes from one batch to the next without a round trip through this thread.
BULK_AHEAD = 1
# Bulk batches are cut to the time budget while a query came in the last this many seconds.
INTERACTIVE_RECENT_SECONDS = 2.0
# The smallest bulk batch the time budget may cut to (fewer tokens cost more per token).
MIN_BULK_BATCH_TOKENS = 64
# The largest a bulk batch may grow to for a fast model (its activations stay small).
MAX_BULK_BATCH_TOKENS = 16384


def _real_tokens(batch: list[tuple[Group, int]]) -> int:
    return sum(group.tokens(row, row + 1) for group, row in batch)


@dataclass
class _Window:
    """Rows taken from a lane's queue: (group, start, stop) spans."""

    spans: list[tuple[Group, int, int]] = field(default_factory=list)
    tokens: int = 0
    rows: int = 0


class Scheduler:
    """The scheduler thread (and, without a pool, the thread that runs the forwards)."""

    def __init__(
        self,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        pool: WorkerPool | None = None,
        bulk_batch_seconds: float = 0.0,
        bulk_fill_seconds: float = 0.0,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.bulk_batch_seconds = bulk_batch_seconds
        self.bulk_fill_seconds = bulk_fill_seconds
        self._on_batch = on_batch
        self.pool = pool
        # Batches handed to the pool and not finished. Queries: at most one per ready
        # process. Bulk: one per process that takes bulk work plus BULK_AHEAD waiting in the
        # pool, so a process that finishes a batch starts the next at once; the pool hands a
        # free process a query before a waiting bulk batch, so a query still waits for at
        # most the batch in progress, and a process kept for queries stays free for them.
        self._in_flight = 0
        self._in_flight_bulk = 0
        self._cond = threading.Condition()
        if pool is not None:
            pool.on_capacity_change(self._wake)
        # Per lane, per model: FIFO queues of groups (a group's rows leave from its cursor).
        self._interactive: dict[str, deque[Group]] = {}
        self._bulk: dict[str, deque[Group]] = {}
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        # Planned bulk batches not yet started (taken from the queue, sorted by length).
        self._ready: deque[list[tuple[Group, int]]] = deque()
        self._planned_tokens = 0  # the real tokens of `_ready`
        self._queued_tokens = 0
        self._queued_rows = 0
        self._last_interactive = -1e9
        # Per model: measured padded tokens per second of compute (for the time budget).
        self._speed: dict[str, float] = {}
        self._stopping = False
        self._exiting = False
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        # A daemon thread that has computed and is still alive when the interpreter
        # finalizes aborts the process (MLX's streams): a scheduler nobody stopped is
        # stopped at exit, dropping what it still had queued.
        atexit.register(self.stop, 30.0, drop_queued=True)

    def stop(self, timeout: float | None = None, drop_queued: bool = False) -> None:
        """Finish everything queued (or, `drop_queued`, only the batch in progress: the rest
        fails with UNAVAILABLE), then end the thread."""
        atexit.unregister(self.stop)
        with self._cond:
            self._stopping = True
            self._exiting = self._exiting or drop_queued
            self._cond.notify_all()
        self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting: in the queues and in planned batches not yet started."""
        return self._queued_tokens + self._planned_tokens

    @property
    def queued_items(self) -> int:
        with self._cond:
            return self._queued_rows + sum(len(batch) for batch in self._ready)

    @property
    def _lanes(self) -> tuple[dict[str, deque[Group]], ...]:
        return (self._interactive, self._bulk)

    @property
    def copies(self) -> int:
        """How many copies of a model's weights computing needs: one per engine worker
        process, else the one in this process."""
        return self.pool.processes if self.pool is not None else 1

    def load_everywhere(self, spec: ModelSpec) -> NetworkFacts:
        """Load (and warm up) a model's network in every engine worker process, blocking;
        processes respawned later load it too. Only with a pool."""
        if self.pool is None:
            raise RuntimeError("no engine workers: load the model on this thread (call)")
        return self.pool.load(spec)

    def unload_everywhere(self, name: str) -> None:
        if self.pool is not None:
            self.pool.unload(name)

    def remote_compute(self, model: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A blocking forward of `model` in the engine workers, for an engine's front half
        (its self-check and calibration). Not for the serving path: that goes in groups."""
        pool = self.pool
        if pool is None:
            raise RuntimeError("no engine workers")

        def compute(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            return pool.submit(model, ids, lengths).result()

        return compute

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on this thread (in-process model loads, warm-up)."""
        future: Future[T] = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def submit_group(
        self,
        model: BatchModel,
        ids: np.ndarray,
        offsets: np.ndarray,
        interactive: bool = False,
    ) -> Future[GroupOutput]:
        """Queue a group of texts (text i is ids[offsets[i]:offsets[i+1]]); one future."""
        future: Future[GroupOutput] = Future()
        group = Group(model, ids, offsets, future, interactive)
        if group.rows == 0:
            future.set_result(GroupOutput(np.zeros((0, 0), np.float32), {}))
            return future
        lane = self._interactive if interactive else self._bulk
        with self._cond:
            if interactive:
                self._last_interactive = time.monotonic()
            batch = self._direct_batch(group) if interactive else None
            if batch is not None:
                self._count_in_flight(batch)
            else:
                lane.setdefault(model.name, deque()).append(group)
                self._queued_tokens += int(offsets[-1])
                self._queued_rows += group.rows
                self._cond.notify()
                return future
        assert self.pool is not None  # a direct batch needs one
        self._dispatch(self.pool, batch)
        return future

    def _direct_batch(self, group: Group) -> Batch | None:
        """(lock held) A query that a free engine process can take now, as one batch, goes
        straight to the pool from the caller's thread: waking this scheduler thread on the
        way costs an idle core's wake-up. Only when no other query waits (they keep their
        order) and the group is one batch as planned."""
        pool = self.pool
        if pool is None or self._stopping or any(q for q in self._interactive.values()):
            return None
        if self._in_flight - self._in_flight_bulk >= pool.ready_count:
            return None
        lengths = np.diff(group.offsets).astype(np.int32)
        if len(plan_batches(lengths, self.max_batch_tokens, self.max_batch_size)) != 1:
            return None
        group.cursor = group.rows
        return Batch(
            model=group.model,
            parts=[(group, np.arange(group.rows, dtype=np.int64))],
            ids=group.ids,
            lengths=lengths,
            enqueued_at=group.enqueued_at,
            interactive=True,
        )

    def submit(
        self, model: BatchModel, ids: Sequence[int], interactive: bool = False
    ) -> Future[GroupOutput]:
        """One text as a group of one (tests, tools)."""
        return self.submit_group(
            model,
            np.asarray(ids, dtype=np.int32),
            np.array([0, len(ids)], dtype=np.int64),
            interactive,
        )

    # --- Planning (lock held) -------------------------------------------------------------

    def _bulk_batch_tokens(self, model: str, now: float) -> int:
        """The token budget of the next bulk batch, from the model's measured speed: about
        `bulk_batch_seconds` of compute. While queries arrive, at most `max_batch_tokens`
        (a query waits for at most one such batch), and no cut while a process kept for
        queries is ready (no query waits for a bulk batch then); with no queries, at least
        `max_batch_tokens`, and more for a model so fast that a batch's fixed cost would
        dominate."""
        speed = self._speed.get(model)
        if not self.bulk_batch_seconds or speed is None:
            return self.max_batch_tokens
        budget = int(speed * self.bulk_batch_seconds)
        if now - self._last_interactive > INTERACTIVE_RECENT_SECONDS:
            return max(self.max_batch_tokens, min(MAX_BULK_BATCH_TOKENS, budget))
        if self.pool is not None and self.pool.ready_query_processes:
            return self.max_batch_tokens
        return max(MIN_BULK_BATCH_TOKENS, min(self.max_batch_tokens, budget))

    def _bulk_batch_rows(self, tokens: int) -> int:
        """Rows per bulk batch: the configured cap, raised with a raised token budget."""
        return max(self.max_batch_size, self.max_batch_size * tokens // self.max_batch_tokens)

    def _take_from(
        self, queues: dict[str, deque[Group]], max_tokens: int, max_rows: int
    ) -> _Window:
        """Rows of the oldest groups of the next model, up to the limits. Round-robin across
        models. Rows of cancelled groups leave without being taken."""
        window = _Window()
        for name in list(queues):
            queue = queues[name]
            if not queue:
                continue
            queues[name] = queues.pop(name)  # round-robin: this model to the back
            while queue and window.tokens < max_tokens and window.rows < max_rows:
                group = queue[0]
                start = group.cursor
                if group.gone:
                    stop = group.rows
                else:
                    stop = start
                    room = max_tokens - window.tokens
                    # Whole rows until the token room is spent (at least one row).
                    ends = group.offsets[start + 1 :] - group.offsets[start]
                    fit = int(np.searchsorted(ends, room, side="right"))
                    stop = start + max(1, min(fit, max_rows - window.rows))
                    window.spans.append((group, start, stop))
                    window.tokens += group.tokens(start, stop)
                    window.rows += stop - start
                self._queued_tokens -= group.tokens(start, stop)
                self._queued_rows -= stop - start
                group.cursor = stop
                if stop == group.rows:
                    queue.popleft()
            return window
        return window

    def _plan(
        self, window: _Window, batch_tokens: int, batch_rows: int
    ) -> list[list[tuple[Group, int]]]:
        rows: list[tuple[Group, int]] = []
        lengths: list[np.ndarray] = []
        for group, start, stop in window.spans:
            rows.extend((group, r) for r in range(start, stop))
            lengths.append(np.diff(group.offsets[start : stop + 1]))
        if not rows:
            return []
        plan = plan_batches(np.concatenate(lengths), batch_tokens, batch_rows)
        return [[rows[i] for i in indices] for indices in plan]

    def _next_batch(self, now: float) -> list[tuple[Group, int]]:
        """The interactive lane first; then the planned bulk batches; then plan a new bulk
        window."""
        window = self._take_from(self._interactive, self.max_batch_tokens, self.max_batch_size)
        if window.spans:
            first, *rest = self._plan(window, self.max_batch_tokens, self.max_batch_size)
            self._add_planned(rest, front=True)
            return first
        if self._bulk_full():
            return []  # the query in the lane was cancelled; bulk work waits for a process
        if not self._ready:
            name = next((n for n, q in self._bulk.items() if q), None)
            if name is not None:
                tokens = self._bulk_batch_tokens(name, now)
                rows = self._bulk_batch_rows(tokens)
                window = self._take_from(
                    self._bulk, BULK_WINDOW_BATCHES * tokens, BULK_WINDOW_BATCHES * rows
                )
                self._add_planned(self._plan(window, tokens, rows))
        if not self._ready:
            return []
        batch = self._ready.popleft()
        self._planned_tokens -= _real_tokens(batch)
        return batch

    def _add_planned(self, batches: list[list[tuple[Group, int]]], front: bool = False) -> None:
        self._planned_tokens += sum(map(_real_tokens, batches))
        if front:
            self._ready.extendleft(reversed(batches))
        else:
            self._ready.extend(batches)

    def _fill_wait(self, now: float) -> float:
        """Seconds to let a small bulk batch fill (0: start now). Only when nothing else is
        waiting and the oldest bulk rows are younger than the fill window."""
        if not self.bulk_fill_seconds or self._ready or self._stopping:
            return 0.0
        if any(q for q in self._interactive.values()):
            return 0.0
        oldest = min((q[0].enqueued_at for q in self._bulk.values() if q), default=None)
        if oldest is None:
            return 0.0
        name = next(n for n, q in self._bulk.items() if q)
        if self._queued_tokens >= self._bulk_batch_tokens(name, now) // 2:
            return 0.0
        return max(0.0, oldest + self.bulk_fill_seconds - now)

    def _has_items(self) -> bool:
        return bool(self._ready) or any(q for lane in self._lanes for q in lane.values())

    def _pool_full(self) -> bool:
        """(lock held) No process is free for the next batch: a query, if one is queued,
        else bulk work."""
        pool = self.pool
        if pool is None:
            return False
        if any(q for q in self._interactive.values()):
            return self._in_flight - self._in_flight_bulk >= max(1, pool.ready_count)
        return self._bulk_full()

    def _bulk_full(self) -> bool:
        pool = self.pool
        return pool is not None and self._in_flight_bulk >= max(1, pool.bulk_capacity) + BULK_AHEAD

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            release_thread_streams()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._exiting:
                        self._drop_queued(Unavailable("the server process is exiting"))
                        return
                    if self._jobs:
                        break
                    if not self._has_items():
                        if self._stopping:
                            while self._in_flight:  # let the pool's batches finish
                                self._cond.wait()
                            return
                        self._cond.wait()
                        continue
                    if self._pool_full():
                        self._cond.wait()
                        continue
                    now = time.monotonic()
                    wait = self._fill_wait(now)
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                job: tuple[Callable[[], Any], Future[Any]] | None = None
                batch: Batch | None = None
                if self._jobs:
                    job = self._jobs.popleft()
                else:
                    batch = self._start(self._next_batch(time.monotonic()))
            if job is not None:
                self._run_job(*job)
            elif batch is not None:
                self._run_batch(batch)

    def _drop_queued(self, exc: BaseException) -> None:
        """(lock held) Fail every queued group and job: nothing will compute them."""
        groups = [g for lane in self._lanes for queue in lane.values() for g in queue]
        groups += [g for batch in self._ready for g, _ in batch]
        futures: list[Future[Any]] = [g.future for g in groups]
        futures += [future for _, future in self._jobs]
        for lane in self._lanes:
            lane.clear()
        self._ready.clear()
        self._planned_tokens = 0
        self._jobs.clear()
        self._queued_tokens = self._queued_rows = 0
        for future in futures:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(exc)

    def _start(self, rows: list[tuple[Group, int]]) -> Batch | None:
        """(lock held) The batch of `rows` still wanted: callers that gave up leave it."""
        live = [(g, r) for g, r in rows if not g.gone]
        if not live:
            return None
        # Each group's rows side by side, so its vectors come back as one slice.
        parts: dict[int, tuple[Group, list[int]]] = {}
        for group, row in live:
            parts.setdefault(id(group), (group, []))[1].append(row)
        chunks = [
            group.ids[group.offsets[row] : group.offsets[row + 1]]
            for group, rows in parts.values()
            for row in rows
        ]
        ids = np.concatenate(chunks)
        lengths = np.fromiter(map(len, chunks), dtype=np.int32, count=len(chunks))
        return Batch(
            model=live[0][0].model,
            parts=[(g, np.asarray(r, dtype=np.int64)) for g, r in parts.values()],
            ids=ids,
            lengths=lengths,
            enqueued_at=min(g.enqueued_at for g, _ in live),
            interactive=all(g.interactive for g, _ in live),
        )

    @staticmethod
    def _run_job(fn: Callable[[], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _run_batch(self, batch: Batch) -> None:
        if self.pool is not None:
            with self._cond:
                self._count_in_flight(batch)
            self._dispatch(self.pool, batch)
            return
        started = time.monotonic()
        try:
            vectors = batch.model.forward_packed(batch.ids, batch.lengths)
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._finish(batch, vectors, started)

    def _count_in_flight(self, batch: Batch, sign: int = 1) -> None:
        """(lock held) A batch handed to the pool (+1) or back from it (-1)."""
        self._in_flight += sign
        self._in_flight_bulk += 0 if batch.interactive else sign

    def _dispatch(self, pool: WorkerPool, batch: Batch) -> None:
        """Hand a batch, counted in flight, to a worker process; its results arrive on a pool
        thread."""
        started = time.monotonic()
        future = pool.submit(
            batch.model.name,
            batch.ids,
            batch.lengths,
            batch.interactive,
            wanted=lambda: any(not group.gone for group, _ in batch.parts),
        )

        def done(future: Future[np.ndarray]) -> None:
            try:
                if future.cancelled():  # every caller gave up before a process took it
                    return
                error = future.exception()
                if error is None:
                    self._finish(batch, future.result(), started)
                elif isinstance(error, RowFailures):
                    self._finish(batch, error.vectors, started, error.errors)
                else:
                    self._fail(batch, error)
            finally:
                with self._cond:
                    self._count_in_flight(batch, -1)
                    self._cond.notify_all()

        future.add_done_callback(done)

    def _fail(self, batch: Batch, exc: BaseException) -> None:
        log.error("batch of %d on %s failed: %s", len(batch.lengths), batch.model.name, exc)
        with self._cond:
            for group, rows in batch.parts:
                group.fail(rows, exc)

    def _finish(
        self,
        batch: Batch,
        vectors: np.ndarray,
        started: float,
        failed: dict[int, BaseException] | None = None,
    ) -> None:
        done = time.monotonic()
        # Counted before any caller is answered: a caller that reads the metrics right after
        # its answer must see its own batch.
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(
                    model=batch.model.name,
                    rows=len(batch.lengths),
                    real_tokens=int(batch.lengths.sum()),
                    padded_tokens=batch.padded_tokens,
                    queue_seconds=started - batch.enqueued_at,
                    compute_seconds=done - started,
                )
            )
        with self._cond:
            position = 0
            for group, rows in batch.parts:
                for offset in range(len(rows)) if failed else ():
                    error = failed.get(position + offset) if failed else None
                    if error is not None:
                        group.errors[int(rows[offset])] = error
                group.deliver(rows, vectors[position : position + len(rows)])
                position += len(rows)
            seconds = done - started
            if seconds > 0:
                speed = batch.padded_tokens / seconds
                previous = self._speed.get(batch.model.name)
                self._speed[batch.model.name] = (
                    speed if previous is None else 0.8 * previous + 0.2 * speed
                )
