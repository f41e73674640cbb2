"""Engine worker processes: the same models in N processes, one per core, supervised.

MLX's CPU backend runs each elementwise op (softmax, layer norm, GELU) on one thread, and
OpenBLAS's threads speed up only the matmuls: one process with two BLAS threads keeps a
2-core machine about half busy. N processes with one BLAS thread each keep N cores busy
with all of the work (docs/performance.md has the numbers). Each process is its own MLX
runtime, so "one thread owns all MLX work" holds per process: the process's main thread.

The pool speaks in packed token ids: `submit(model, ids, lengths)` queues a batch (the ids of
B texts back to back, and their lengths) and returns a Future of the pooled float32 vectors
(B, dim), exactly what `EmbeddingEngine.forward_packed` returns. Tokenising, batching and
normalising stay in the server. Messages between the processes are typed (`Request`,
`Reply`); arrays travel as arrays.

Supervision. Each process has a slot thread in the server that feeds it one batch at a time
and watches it:
- a process that dies (the OOM killer's SIGKILL, a crash) is respawned with every model the
  pool serves, and the batch it was computing is queued again, at the front, for whichever
  process is free first: the callers get their vectors, not an error. A batch that kills a
  process a second time fails alone, with a message that says so;
- a process that stops answering (SIGSTOP, a hang) is found by a watchdog: a batch past a
  limit derived from its size and the model's measured speed kills the process, which is
  then handled as dead;
- `ready_count` is the processes that can compute now; callbacks hear when it changes (the
  server's health goes NOT_SERVING only while it is 0, the scheduler adapts its batches in
  flight). Counters: restarts, re-runs, failed batches.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedError, ErrorKind, ModelLoadError, ModelNotAvailable, Unavailable
from ..modeling.engine import NetworkFacts, release_thread_streams
from ..modeling.precision import ModelPrecision

log = logging.getLogger(__name__)

# Set to a token id to make a worker process exit on any batch that holds it: fault
# injection for the supervision tests (a batch that always kills its worker).
FAULT_TOKEN_ENV = "AKIDB_EMBED_FAULT_KILL_ON_TOKEN"

# Beside a process kept for queries, the bulk processes run at this niceness: the kernel
# then hands a core to the query process (and to the server's own threads) the moment they
# have work, instead of sharing it with a bulk batch. Measured on 2 cores, all-minilm-l6-v2,
# 10 queries/s during a bulk stream: query p50 38 -> 26 ms (idle: 24-27 ms), the bulk
# stream at 0.93 -> 0.99 of its rate alone. Raising one's own niceness needs no privilege.
BULK_NICENESS = 10


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load a model (the arguments of `loader.load_engine`)."""

    name: str
    directory: Path
    source: str
    revision: str
    # The server's precision settings; None: this process's environment.
    precision: ModelPrecision | None = None


# The longest pause between tries to start a worker that keeps dying before it is ready.
RESPAWN_PAUSE_MAX = 10.0


class WorkerCrashed(EmbedError):
    """A text killed engine worker processes twice; it is not tried again."""

    kind = ErrorKind.INTERNAL


class RowFailures(Exception):
    """Some rows of a batch failed: `vectors` holds the others' rows (failed rows zero)."""

    def __init__(self, vectors: np.ndarray, errors: dict[int, BaseException]) -> None:
        super().__init__(f"{len(errors)} of {len(vectors)} rows failed")
        self.vectors = vectors
        self.errors = errors


# --- Messages between the processes -----------------------------------------------------


class Op(enum.Enum):
    LOAD = "load"
    UNLOAD = "unload"
    FORWARD = "forward"
    STOP = "stop"


@dataclass(frozen=True)
class Request:
    op: Op
    model: str = ""
    spec: ModelSpec | None = None
    ids: np.ndarray | None = None  # FORWARD: int32, back to back
    lengths: np.ndarray | None = None  # FORWARD: int32, one per text


@dataclass(frozen=True)
class Reply:
    vectors: np.ndarray | None = None  # FORWARD: float32 (B, dim)
    facts: NetworkFacts | None = None  # LOAD: what loading decided (dtype, width, bytes)
    error: BaseException | None = None


# --- Sizing ------------------------------------------------------------------------------


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPUs a cgroup v2 quota allows (a container's CPU limit), or None if unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


# Measured with all-minilm-l6-v2 (docs/operations.md): each engine worker is ~205 MB RSS,
# ~170 MB of it private (Python, MLX, the tokenizer, its copy of the weights); the server
# process itself ~205 MB. A worker costs its base plus the weights of the models it loads.
WORKER_BASE_BYTES = 110 * 2**20
SERVER_BYTES = 256 * 2**20
DEFAULT_MODEL_BYTES = 90 * 2**20
# Share of the memory limit workers may fill; the rest is batches, queues and page cache.
MEMORY_HEADROOM = 0.8


def cgroup_memory_limit(
    memory_max: Path = Path("/sys/fs/cgroup/memory.max"),
    v1_limit: Path = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
) -> int | None:
    """A container's memory limit in bytes (cgroup v2 `memory.max`, else v1), or None."""
    for path in (memory_max, v1_limit):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value == "max":
            return None
        try:
            limit = int(value)
        except ValueError:
            continue
        # cgroup v1 writes "unlimited" as a huge page-aligned number.
        return limit if limit < 2**60 else None
    return None


def memory_limit() -> int | None:
    """The bytes this process may use: the container's limit, capped by the machine's RAM."""
    limits = [limit for limit in (cgroup_memory_limit(),) if limit is not None]
    try:
        import psutil

        limits.append(int(psutil.virtual_memory().total))
    except Exception:  # pragma: no cover - psutil is a dependency; be safe anyway
        pass
    return min(limits) if limits else None


def workers_for_memory(budget_bytes: int, model_bytes: int = DEFAULT_MODEL_BYTES) -> int:
    """How many engine workers fit in `budget_bytes` next to the server process, which
    holds no weights of its own while workers compute (engine.py's front half)."""
    usable = budget_bytes * MEMORY_HEADROOM - SERVER_BYTES
    return max(0, int(usable // (WORKER_BASE_BYTES + model_bytes)))


def default_processes(
    memory_budget: int | None = None, model_bytes: int = DEFAULT_MODEL_BYTES
) -> int:
    """One per core this process may use (its CPU affinity, capped by a container's quota),
    and no more than fit in memory: `memory_budget` bytes, else the container's memory limit
    (cgroup memory.max), else the machine's RAM."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    budget = memory_budget if memory_budget is not None else memory_limit()
    if budget is not None:
        cores = min(cores, max(1, workers_for_memory(budget, model_bytes)))
    return max(1, cores)


def default_workers(
    on_gpu: bool, memory_budget: int | None = None, model_bytes: int = DEFAULT_MODEL_BYTES
) -> int:
    """Engine worker processes by default: one per core on CPU, as many as memory allows (see
    `default_processes`), none when only one would fit; one on a GPU (the device is one, but
    a crash of the engine must not take the server down)."""
    if on_gpu:
        return 1
    processes = default_processes(memory_budget, model_bytes)
    return processes if processes > 1 else 0


def default_query_workers(
    on_gpu: bool,
    workers: int,
    memory_budget: int | None = None,
    model_bytes: int = DEFAULT_MODEL_BYTES,
) -> int:
    """Processes kept for queries by default: one beside CPU engine workers if memory has
    room for one more copy of the models (`workers_for_memory`), else none; none on a GPU
    (one device) or without engine workers."""
    if on_gpu or workers < 1:
        return 0
    budget = memory_budget if memory_budget is not None else memory_limit()
    if budget is not None and workers_for_memory(budget, model_bytes) < workers + 1:
        return 0
    return 1


def default_batch_tokens(on_gpu: bool) -> int:
    """Padded tokens per batch. On CPU a batch whose activations fit in the core's cache
    is ~1.5x faster than an 8192-token one (docs/performance.md)."""
    return 8192 if on_gpu else 512


@dataclass(frozen=True)
class Watchdog:
    """How long a batch may take before its process is deemed hung and killed: `factor`
    times what its padded tokens should take at the model's measured speed, and never less
    than `min_seconds` (a first batch has no measurement: `first_seconds`)."""

    min_seconds: float = 10.0
    factor: float = 20.0
    first_seconds: float = 120.0
    load_seconds: float = 600.0

    def limit(self, padded_tokens: int, tokens_per_second: float | None) -> float:
        if not tokens_per_second:
            return max(self.min_seconds, self.first_seconds)
        return max(self.min_seconds, self.factor * padded_tokens / tokens_per_second)


# --- The child process -------------------------------------------------------------------


def _worker_main(conn: Connection, blas_threads: int, niceness: int = 0) -> None:
    """A worker's main thread: load models, run forwards, until told to stop or orphaned."""
    from ..host import blas

    # Ctrl-C, and systemd's SIGTERM, reach the whole process group: the server drains and
    # then stops its workers itself (or its pipe closes when it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    blas.set_openblas_threads(blas_threads)
    if niceness:
        with contextlib.suppress(OSError):  # a platform without it: equal priority
            os.nice(niceness)
    try:
        _serve_requests(conn)
    finally:
        release_thread_streams()


def _serve_requests(conn: Connection) -> None:
    from ..modeling.loader import load_engine

    fault_token = os.environ.get(FAULT_TOKEN_ENV)
    poison = int(fault_token) if fault_token else None
    # The engines are this function's own: they are freed before the streams they used.
    engines: dict[str, Any] = {}
    while True:
        try:
            request: Request = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        try:
            reply = Reply()
            if request.op is Op.FORWARD:
                engine = engines.get(request.model)
                if engine is None:
                    raise ModelNotAvailable(
                        f"model {request.model!r} is not loaded in the engine workers"
                    )
                assert request.ids is not None and request.lengths is not None
                if poison is not None and (request.ids == poison).any():
                    os._exit(70)
                reply = Reply(vectors=engine.forward_packed(request.ids, request.lengths))
            elif request.op is Op.LOAD:
                spec = request.spec
                assert spec is not None
                precision = spec.precision
                engine = load_engine(
                    spec.directory,
                    name=spec.name,
                    source=spec.source,
                    revision=spec.revision,
                    precision=None if precision is None else precision.policy,
                    cpu_precision=None if precision is None else precision.cpu,
                )
                engine.warm_up()
                engines[spec.name] = engine
                reply = Reply(facts=engine.facts)
            elif request.op is Op.UNLOAD:
                engines.pop(request.model, None)
            elif request.op is Op.STOP:
                conn.send(Reply())
                return
            conn.send(reply)
        except BaseException as exc:  # report, keep serving
            conn.send(Reply(error=_portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (domain errors do), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ": often the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# --- The parent side ---------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    model: str
    ids: np.ndarray
    lengths: np.ndarray
    future: Future[np.ndarray]
    attempts: int = 0
    first_failure: str = ""
    interactive: bool = False
    # Asked when a process takes the job: False (every caller gave up) skips it.
    wanted: Callable[[], bool] | None = None

    @property
    def padded_tokens(self) -> int:
        return len(self.lengths) * int(self.lengths.max()) if len(self.lengths) else 0


class _ProcessDied(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


@dataclass(eq=False)
class _Slot:
    """One worker process (respawned as needed) and the thread that feeds and watches it."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    loaded: set[str] = field(default_factory=set)
    ready: bool = False
    busy: bool = False
    thread: threading.Thread | None = None
    # Consecutive deaths before the process ever became ready: a worker that cannot start
    # (a broken install, no memory) is retried with a growing pause, not in a tight loop.
    failed_starts: int = 0
    ever_ready: bool = False
    # Kept for queries: it takes bulk work only while no other process can.
    for_queries: bool = False


class WorkerPool:
    """N supervised worker processes running the same models, plus `query_processes` kept
    for queries (interactive batches); thread-safe.

    Any free process takes a query first. A query process takes bulk batches only while no
    bulk process is ready, so a query never waits for a bulk batch to finish: on a machine
    whose cores all compute bulk batches, the query shares a core for its few milliseconds
    instead of queueing behind a batch (docs/serving-path.md has the numbers)."""

    def __init__(
        self,
        processes: int | None = None,
        blas_threads: int = 1,
        watchdog: Watchdog | None = None,
        query_processes: int = 0,
    ) -> None:
        count = processes if processes is not None else default_processes()
        if count < 1:
            raise ValueError(f"processes={count}: a pool needs at least one process")
        if query_processes < 0:
            raise ValueError(f"query_processes={query_processes}: must be 0 or more")
        self.blas_threads = blas_threads
        self.watchdog = watchdog or Watchdog()
        self._context = multiprocessing.get_context("spawn")  # never fork a process with MLX
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._queries: deque[_Job] = deque()
        self._desired: dict[str, ModelSpec] = {}
        # Per model: slot index -> error text of a failed load (cleared on the next load).
        self._load_errors: dict[str, dict[int, str]] = {}
        # What loading each model decided, from the first process that loaded it.
        self._facts: dict[str, NetworkFacts] = {}
        self._speed: dict[str, float] = {}
        self._listeners: list[Callable[[], None]] = []
        self._closing = False
        self.restarts = 0
        self.reruns = 0
        self.failed_batches = 0
        self.last_failure = ""
        self._slots = [_Slot(i) for i in range(count)] + [
            _Slot(count + i, for_queries=True) for i in range(query_processes)
        ]
        for slot in self._slots:
            self._spawn(slot)
        for slot in self._slots:
            slot.thread = threading.Thread(
                target=self._run_slot, args=(slot,), name=f"engine-worker-{slot.index}", daemon=True
            )
            slot.thread.start()
        # Before multiprocessing's own exit hook, which would wait for workers that ignore
        # SIGTERM (registered later, runs earlier).
        atexit.register(self.close)

    # --- What callers see ----------------------------------------------------------------

    @property
    def processes(self) -> int:
        return len(self._slots)

    @property
    def ready_count(self) -> int:
        """Processes alive with every model loaded: the ones that can compute now."""
        return sum(1 for slot in self._slots if slot.ready)

    @property
    def query_processes(self) -> int:
        return sum(1 for slot in self._slots if slot.for_queries)

    @property
    def ready_query_processes(self) -> int:
        """Processes kept for queries that can compute now."""
        return sum(1 for slot in self._slots if slot.ready and slot.for_queries)

    @property
    def bulk_capacity(self) -> int:
        """Bulk batches that can run at once: the ready bulk processes, or, while none is,
        the ready query processes."""
        bulk = sum(1 for slot in self._slots if slot.ready and not slot.for_queries)
        return bulk or self.ready_count

    @property
    def models(self) -> list[str]:
        return sorted(self._desired)

    def pids(self) -> list[int]:
        return [
            slot.process.pid
            for slot in self._slots
            if slot.process is not None and slot.process.pid is not None
        ]

    def on_capacity_change(self, listener: Callable[[], None]) -> None:
        """`listener()` runs (on a pool thread) whenever `ready_count` may have changed."""
        self._listeners.append(listener)

    def _capacity_changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("capacity listener failed")

    def load(self, spec: ModelSpec, timeout: float | None = None) -> NetworkFacts:
        """Load (and warm up) a model in every process; raises ModelLoadError on failure.
        Processes respawned later load it too. Returns what loading decided (one copy)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._desired[spec.name] = spec
            self._load_errors[spec.name] = {}
            self._cond.notify_all()
            while True:
                errors = self._load_errors.get(spec.name, {})
                if errors:
                    break
                live = [s for s in self._slots if s.process is not None and s.process.is_alive()]
                facts = self._facts.get(spec.name)
                if live and facts is not None and all(spec.name in s.loaded for s in live):
                    return facts
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    errors = {-1: f"not loaded after {timeout:.0f}s"}
                    break
                self._cond.wait(remaining if remaining is not None else 1.0)
        self.unload(spec.name)
        detail = next(iter(errors.values()))
        raise ModelLoadError(f"model {spec.name!r} failed to load in an engine worker: {detail}")

    def unload(self, name: str) -> None:
        with self._cond:
            self._desired.pop(name, None)
            self._load_errors.pop(name, None)
            self._facts.pop(name, None)
            self._cond.notify_all()

    def submit(
        self,
        model: str,
        ids: np.ndarray,
        lengths: np.ndarray,
        interactive: bool = False,
        wanted: Callable[[], bool] | None = None,
    ) -> Future[np.ndarray]:
        """Pooled float32 vectors (B, dim) of a packed batch, from the first free process
        (an interactive batch: ahead of bulk ones, and on a query process too). If `wanted`
        says False when a process takes the batch, it is skipped and its future cancelled."""
        future: Future[np.ndarray] = Future()
        job = _Job(
            model,
            np.asarray(ids, np.int32),
            np.asarray(lengths, np.int32),
            future,
            interactive=interactive,
            wanted=wanted,
        )
        with self._cond:
            if self._closing:
                future.set_exception(Unavailable("the engine workers are shutting down"))
                return future
            (self._queries if interactive else self._jobs).append(job)
            self._cond.notify_all()
        return future

    def _has_job_for(self, slot: _Slot) -> bool:
        """(lock held) Whether `slot` has a batch to take: a query, or bulk work unless it
        is kept for queries and a bulk process is ready."""
        if self._queries:
            return True
        if not self._jobs:
            return False
        return not slot.for_queries or not any(s.ready and not s.for_queries for s in self._slots)

    def forward(self, model: str, batch: list[list[int]]) -> np.ndarray:
        """Blocking forward of id lists (tests, tools)."""
        from ..modeling.tokenization import pack

        packed = pack(batch)
        return self.submit(model, packed.ids, packed.lengths).result()

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process (idempotent). Queued batches fail with UNAVAILABLE."""
        atexit.unregister(self.close)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            jobs, self._jobs = list(self._queries) + list(self._jobs), deque()
            self._queries = deque()
            self._cond.notify_all()
        for job in jobs:
            job.future.set_exception(Unavailable("the engine workers are shutting down"))
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(timeout)
        for slot in self._slots:
            self._stop_process(slot, timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- Slots ---------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        conn, child = self._context.Pipe()
        niceness = 0 if slot.for_queries or not self.query_processes else BULK_NICENESS
        process = self._context.Process(
            target=_worker_main,
            args=(child, self.blas_threads, niceness),
            name=f"akidb-embed-worker-{slot.index}",
            daemon=True,
        )
        process.start()
        child.close()
        slot.process, slot.conn, slot.loaded = process, conn, set()

    def _stop_process(self, slot: _Slot, timeout: float) -> None:
        process, conn = slot.process, slot.conn
        if process is None or conn is None:
            return
        if process.is_alive():
            with contextlib.suppress(Exception):
                conn.send(Request(Op.STOP))
                if conn.poll(timeout):
                    conn.recv()
            process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout)
        conn.close()

    def _call(self, slot: _Slot, request: Request, limit: float) -> Reply:
        """Send one request and wait for its reply, the process's death, or the limit."""
        process, conn = slot.process, slot.conn
        assert process is not None and conn is not None
        try:
            conn.send(request)
        except OSError:
            process.join(5)
            raise _ProcessDied(_describe_exit(process.exitcode)) from None
        ready = wait([conn, process.sentinel], limit)
        if not ready:
            process.kill()
            process.join(5)
            raise _ProcessDied(f"stopped answering for {limit:.1f}s and was killed")
        if conn in ready:
            with contextlib.suppress(EOFError, OSError):
                reply: Reply = conn.recv()
                return reply
        process.join(5)
        raise _ProcessDied(_describe_exit(process.exitcode))

    def _set_ready(self, slot: _Slot, ready: bool) -> None:
        changed = slot.ready != ready
        slot.ready = ready
        slot.ever_ready = slot.ever_ready or ready
        if changed:
            self._cond.notify_all()
        if changed:
            threading.Thread(target=self._capacity_changed, daemon=True).start()

    def _run_slot(self, slot: _Slot) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                if self._closing:
                    self._set_ready(slot, False)
                    return
            process = slot.process
            if process is None or not process.is_alive():
                how = _describe_exit(process.exitcode) if process is not None else ""
                self._respawn(slot, how)
                continue
            # Bring the process's models to the desired set.
            with self._cond:
                missing = [s for n, s in self._desired.items() if n not in slot.loaded]
                extra = [n for n in slot.loaded if n not in self._desired]
            try:
                for name in extra:
                    self._call(slot, Request(Op.UNLOAD, model=name), self.watchdog.load_seconds)
                    slot.loaded.discard(name)
                for spec in missing:
                    reply = self._call(
                        slot,
                        Request(Op.LOAD, model=spec.name, spec=spec),
                        self.watchdog.load_seconds,
                    )
                    with self._cond:
                        if reply.error is not None:
                            message = getattr(reply.error, "message", None) or str(reply.error)
                            self._load_errors.setdefault(spec.name, {})[slot.index] = message
                        else:
                            slot.loaded.add(spec.name)
                            if reply.facts is not None:
                                self._facts[spec.name] = reply.facts
                        self._cond.notify_all()
                    if reply.error is not None:
                        time.sleep(backoff)
                        backoff = min(10.0, backoff * 2)
            except _ProcessDied as died:
                self._respawn(slot, died.how)
                continue
            with self._cond:
                complete = all(n in slot.loaded for n in self._desired)
                self._set_ready(slot, complete)
                if not complete:
                    continue
                backoff = 0.5
                # Wait for a batch; wake now and then to notice a death while idle.
                while not self._has_job_for(slot) and not self._closing:
                    if any(n not in slot.loaded for n in self._desired) or any(
                        n not in self._desired for n in slot.loaded
                    ):
                        break
                    self._cond.wait(0.5)
                    if not process.is_alive():
                        break
                if self._closing or not self._has_job_for(slot) or not process.is_alive():
                    continue
                job = self._queries.popleft() if self._queries else self._jobs.popleft()
                if job.future.cancelled():
                    continue
                unwanted = job.wanted is not None and not job.wanted()
                if not unwanted:
                    slot.busy = True
                    limit = self.watchdog.limit(job.padded_tokens, self._speed.get(job.model))
            if unwanted:
                job.future.cancel()  # outside the lock: its callbacks take the caller's locks
                continue
            started = time.monotonic()
            try:
                reply = self._call(
                    slot,
                    Request(Op.FORWARD, model=job.model, ids=job.ids, lengths=job.lengths),
                    limit,
                )
            except _ProcessDied as died:
                slot.busy = False
                self._requeue_or_fail(job, slot, died.how)
                self._respawn(slot, died.how)
                continue
            slot.busy = False
            seconds = time.monotonic() - started
            if reply.error is not None:
                job.future.set_exception(reply.error)
                continue
            if seconds > 0 and job.padded_tokens:
                speed = job.padded_tokens / seconds
                previous = self._speed.get(job.model)
                self._speed[job.model] = speed if previous is None else 0.8 * previous + 0.2 * speed
            job.future.set_result(reply.vectors)  # type: ignore[arg-type]

    def _requeue_or_fail(self, job: _Job, slot: _Slot, how: str) -> None:
        """A process died computing `job`. The first time, its texts run again one by one,
        first in line for the next free process, so that a text that kills the engine takes
        only itself down the second time; a text that kills it again fails."""
        name = f"engine worker {slot.index} (pid {slot.process.pid if slot.process else '?'})"
        failure = f"{name} {how}"
        if job.attempts == 0 and not self._closing:
            log.warning("%s computing a batch of %d; running it again", failure, len(job.lengths))
            self._rerun_rows(job, failure)
            return
        with self._cond:
            self.failed_batches += 1
        message = (
            f"this text killed the engine twice ({job.first_failure}; then {failure}); it was "
            "not tried again. Other texts are unaffected; if it repeats, check the server's "
            "memory limit or the text itself"
        )
        self.last_failure = message
        log.error("%s", message)
        job.future.set_exception(WorkerCrashed(message))

    def _rerun_rows(self, job: _Job, failure: str) -> None:
        starts = np.concatenate([[0], np.cumsum(job.lengths)[:-1]]).astype(np.int64)
        rows = [
            _Job(
                job.model,
                job.ids[start : start + length],
                job.lengths[index : index + 1],
                Future(),
                attempts=1,
                first_failure=failure,
                interactive=job.interactive,
            )
            for index, (start, length) in enumerate(zip(starts, job.lengths.tolist(), strict=True))
        ]
        remaining = [len(rows)]
        lock = threading.Lock()

        def row_done(_: Future[np.ndarray]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            errors = {i: r.future.exception() for i, r in enumerate(rows) if r.future.exception()}
            good = [r.future.result() for r in rows if not r.future.exception()]
            if not errors:
                job.future.set_result(np.concatenate(good))
                return
            width = good[0].shape[1] if good else 0
            vectors = np.zeros((len(rows), width), dtype=np.float32)
            for i, r in enumerate(rows):
                if i not in errors:
                    vectors[i] = r.future.result()[0]
            job.future.set_exception(RowFailures(vectors, errors))  # type: ignore[arg-type]

        with self._cond:
            self.reruns += 1
            (self._queries if job.interactive else self._jobs).extendleft(reversed(rows))
            self._cond.notify_all()
        for row in rows:
            row.future.add_done_callback(row_done)

    def _respawn(self, slot: _Slot, how: str) -> None:
        with self._cond:
            self._set_ready(slot, False)
            if self._closing:
                return
        if how:
            self.restarts += 1
            self.last_failure = f"engine worker {slot.index} {how}"
            log.error("engine worker %d %s; starting a new one", slot.index, how)
        if slot.conn is not None:
            slot.conn.close()
        if slot.process is not None and slot.process.is_alive():
            slot.process.kill()
            slot.process.join(5)
        slot.failed_starts = 0 if slot.ever_ready else slot.failed_starts + 1
        slot.ever_ready = False
        if slot.failed_starts > 1:
            pause = min(RESPAWN_PAUSE_MAX, 0.25 * 2 ** (slot.failed_starts - 2))
            log.error(
                "engine worker %d died %d times before it could serve; next try in %.1fs",
                slot.index,
                slot.failed_starts,
                pause,
            )
            time.sleep(pause)
        self._spawn(slot)
