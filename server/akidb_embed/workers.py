"""Engine worker processes: the same models in N processes, one per core.

MLX's CPU backend runs each elementwise op (softmax, layer norm, GELU) on one thread, and
OpenBLAS's threads speed up only the matmuls: one process with two BLAS threads keeps a
2-core machine about half busy. N processes with one BLAS thread each keep N cores busy
with all of the work (the README's Performance section has the numbers). Each process is its own MLX
runtime, so "one thread owns all MLX work" holds per process: the worker's main thread.

The pool speaks in token ids: `submit(model, batch)` sends a list of token-id lists to the
least busy process and returns a Future of the pooled float32 vectors (B, dim), exactly
what `EmbeddingEngine.forward` returns. Tokenising, batching and normalising stay in the
server. Each process holds its own copy of the weights.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbedError, ModelLoadError, ModelNotAvailable, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load a model (the arguments of `loader.load_engine`)."""

    name: str
    directory: Path
    source: str
    revision: str


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPUs a cgroup v2 quota allows (a container's CPU limit), or None if unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


# Measured with all-minilm-l6-v2 (docs/performance.md): each engine worker is ~197 MB RSS,
# ~165 MB of it private (Python, MLX, the tokenizer, its copy of the weights); the server
# process itself ~190 MB. A worker costs its base plus the weights of the models it loads.
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
    """How many engine workers fit in `budget_bytes` next to the server process."""
    usable = budget_bytes * MEMORY_HEADROOM - SERVER_BYTES - model_bytes
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
    """Engine worker processes to run by default: one per core on CPU, as many as memory
    allows (see `default_processes`); none on a GPU, or when only one would fit."""
    if on_gpu:
        return 0
    processes = default_processes(memory_budget, model_bytes)
    return processes if processes > 1 else 0


def default_batch_tokens(on_gpu: bool) -> int:
    """Padded tokens per batch. On CPU a batch whose activations fit in the core's cache
    is ~1.5x faster than an 8192-token one (README, Performance)."""
    return 8192 if on_gpu else 512


# --- The child process -------------------------------------------------------------------


def _worker_main(conn: Connection, blas_threads: int) -> None:
    """A worker's main thread: load models, run forwards, until told to stop or orphaned."""
    import signal

    from . import blas

    # Ctrl-C, and systemd's SIGTERM, reach the whole process group: the server drains and
    # then stops its workers itself (or its pipe closes when it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    blas.set_openblas_threads(blas_threads)

    from .loader import load_engine

    engines: dict[str, Any] = {}
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        try:
            if op == "forward":
                name, batch = payload
                if name not in engines:
                    raise ModelNotAvailable(f"model {name!r} is not loaded in the engine workers")
                result: Any = engines[name].forward(batch)
            elif op == "load":
                spec: ModelSpec = payload
                engine = load_engine(
                    spec.directory, name=spec.name, source=spec.source, revision=spec.revision
                )
                # The first forward compiles kernels and allocates buffers.
                engine.forward([[0, 1, 2], [3]])
                engines[spec.name] = engine
                result = None
            elif op == "unload":
                engines.pop(payload, None)
                result = None
            elif op == "stop":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown worker op {op!r}")
            conn.send(("ok", result))
        except BaseException as exc:  # report, keep serving
            conn.send(("error", _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (domain errors do), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --- The parent side ---------------------------------------------------------------------


class _Worker:
    """One process, its pipe, and a thread that feeds it one request at a time."""

    def __init__(self, index: int, blas_threads: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that ran MLX
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, blas_threads),
            name=f"akidb-embed-worker-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.pending = 0  # requests queued or running here; guarded by the pool's lock
        self._requests: list[tuple[str, Any, Future[Any]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._feed, name=f"worker-{index}", daemon=True)
        self._thread.start()

    def put(self, op: str, payload: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                future.set_exception(Unavailable("the engine workers are shutting down"))
                return future
            self._requests.append((op, payload, future))
            self._cond.notify()
        return future

    def _feed(self) -> None:
        while True:
            with self._cond:
                while not self._requests and not self._closed:
                    self._cond.wait()
                if not self._requests:
                    return
                op, payload, future = self._requests.pop(0)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued: costs no compute
            try:
                self.conn.send((op, payload))
                status, result = self.conn.recv()
            except (EOFError, OSError) as exc:
                code = self.process.exitcode
                future.set_exception(
                    Unavailable(f"engine worker {self.process.name} died (exit code {code})")
                )
                log.error("engine worker %s died: %s", self.process.name, exc)
                continue
            if status == "ok":
                future.set_result(result)
            else:
                future.set_exception(result)

    def close(self, timeout: float) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.put("stop", None).result(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._thread.join(timeout)
        self.conn.close()


class WorkerPool:
    """N worker processes running the same models; thread-safe."""

    def __init__(self, processes: int | None = None, blas_threads: int = 1) -> None:
        count = processes if processes is not None else default_processes()
        if count < 1:
            raise ValueError(f"processes={count}: a pool needs at least one process")
        self._lock = threading.Lock()
        self._workers = [_Worker(i, blas_threads) for i in range(count)]
        self._models: dict[str, ModelSpec] = {}
        # Before multiprocessing's own exit hook, which would wait for workers that ignore
        # SIGTERM (registered later, runs earlier).
        atexit.register(self.close)

    @property
    def processes(self) -> int:
        return len(self._workers)

    @property
    def models(self) -> list[str]:
        return sorted(self._models)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def load(self, spec: ModelSpec, timeout: float | None = None) -> None:
        """Load (and warm up) a model in every process; raises ModelLoadError on failure."""
        futures = [w.put("load", spec) for w in self._workers]
        try:
            for future in futures:
                future.result(timeout)
        except EmbedError:
            self.unload(spec.name)
            raise
        except Exception as exc:
            self.unload(spec.name)
            raise ModelLoadError(f"model {spec.name!r} failed to load in a worker: {exc}") from exc
        self._models[spec.name] = spec

    def unload(self, name: str) -> None:
        self._models.pop(name, None)
        for future in [w.put("unload", name) for w in self._workers]:
            future.result()

    def submit(self, model: str, batch: Sequence[Sequence[int]]) -> Future[np.ndarray]:
        """Pooled float32 vectors (B, dim) for `batch`, from the least busy process."""
        with self._lock:
            worker = min(self._workers, key=lambda w: w.pending)
            worker.pending += 1
        future: Future[np.ndarray] = worker.put("forward", (model, [list(ids) for ids in batch]))
        future.add_done_callback(lambda _: self._done(worker))
        return future

    def _done(self, worker: _Worker) -> None:
        with self._lock:
            worker.pending -= 1

    def forward(self, model: str, batch: Sequence[Sequence[int]]) -> np.ndarray:
        return self.submit(model, batch).result()

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process (idempotent)."""
        atexit.unregister(self.close)
        for worker in self._workers:
            worker.close(timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
