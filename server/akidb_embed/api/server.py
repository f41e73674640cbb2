"""Assembles and runs the gRPC server: transport, services, health, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from ..errors import EmbedError
from ..host.device import gpu_backend
from ..observability.metrics import Metrics, MetricsEndpoint
from ..runtime.backend import describe_backend
from ..runtime.batching import Scheduler
from ..runtime.workers import WorkerPool, default_batch_tokens
from ..service.service import EmbeddingService
from ..store.registry import Registry
from . import sdnotify
from .config import ServerConfig
from .http_api import HttpEndpoint, HttpFrontEnd, HttpSettings
from .interceptor import ObservingInterceptor
from .servicer import EmbeddingServicer
from .unix_socket import BoundSocket, prepare_socket_path

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def restrictive_umask(mode: int) -> Iterator[None]:
    """Create the socket with `mode` from the start, not chmod it after a window."""
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


class EmbeddingServer:
    def __init__(self, config: ServerConfig, registry: Registry | None = None) -> None:
        batch_tokens = config.max_batch_tokens
        if batch_tokens is None:  # by device: what the CLI's default says
            batch_tokens = default_batch_tokens(gpu_backend() is not None)
            config = dataclasses.replace(config, max_batch_tokens=batch_tokens)
        self.config = config
        self.registry = registry or Registry()
        for directory in config.local_model_dirs:
            self.registry.add_local(directory)
        self.metrics = Metrics()
        self.pool = (
            WorkerPool(
                config.workers, watchdog=config.watchdog, query_processes=config.query_workers
            )
            if config.workers > 0
            else None
        )
        self.scheduler = Scheduler(
            batch_tokens,
            config.max_batch_size,
            on_batch=self.metrics.observe_batch,
            pool=self.pool,
            bulk_batch_seconds=config.bulk_batch_seconds,
            bulk_fill_seconds=config.bulk_fill_seconds,
        )
        self.service = EmbeddingService(
            self.registry,
            self.scheduler,
            config.limits,
            config.budget,
            allow_downloads=config.allow_downloads,
            metrics=self.metrics,
            pulls=config.pulls,
            precision=config.precision,
        )
        self.metrics.watch(self.service)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.http: HttpEndpoint | None = None
        self.health = health.aio.HealthServicer()
        self.service.on_model_change = self._model_changed
        self.server = grpc.aio.server(
            interceptors=[ObservingInterceptor(self.metrics)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        self.addresses: list[str] = []
        self._socket: BoundSocket | None = None
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, then load and warm the models; health is NOT_SERVING until they are."""
        backend = describe_backend(self.config.precision.cpu)
        pb_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(
                self.service,
                backend,
                self.config.stream_window,
                self.metrics,
                self.config.max_message_bytes,
            ),
            self.server,
        )
        self.metrics.build.info({"version": self.service.version, "backend": backend})
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self._set_all(NOT_SERVING)
        self._bind()
        self.scheduler.start()
        await self.server.start()
        log.info("listening on %s", ", ".join(self.addresses))
        if self.config.http_port is not None:
            await self._start_http(backend)
        if self.config.metrics_port is not None:
            self.metrics_endpoint = MetricsEndpoint(
                self.metrics.registry, self.config.metrics_host, self.config.metrics_port
            )
        if self.config.models:
            self.registry.default_model = self.config.models[0]
        for name in self.config.models:
            await self.service.engine(name, pin=True)
        self.service.ready = True
        self._loop = asyncio.get_running_loop()
        if self.pool is not None:
            self.pool.on_capacity_change(self._capacity_changed)
        await self._set_all(SERVING if self.service.can_serve() else NOT_SERVING)
        if self.config.budget.keep_alive_seconds:
            self._reaper = asyncio.create_task(self._unload_idle_models())
        log.info(
            "SERVING (backend: %s, %s)",
            describe_backend(self.config.precision.cpu),
            (
                f"{self.pool.processes} engine worker processes, "
                f"{self.pool.query_processes} of them kept for queries"
            )
            if self.pool
            else "in-process engine",
        )

    def limits(self) -> dict[str, int | float]:
        """The limits a client can run into, as GET /info reports them."""
        config = self.config
        return {
            **asdict(config.limits),
            "max_batch_tokens": config.max_batch_tokens,
            "max_batch_size": config.max_batch_size,
            "max_request_bytes": config.max_message_bytes,
            "stream_window": config.stream_window,
            "max_loaded_models": config.budget.max_models,
            "max_loaded_bytes": config.budget.max_bytes,
            "keep_alive_seconds": config.budget.keep_alive_seconds,
            "workers": config.workers,
        }

    async def _start_http(self, backend: str) -> None:
        settings = HttpSettings(
            host=self.config.http_host,
            port=self.config.http_port or 0,
            api_keys=self.config.http_api_keys,
            max_request_bytes=self.config.max_message_bytes,
            backend=backend,
            limits=self.limits(),
        )
        self.http = HttpEndpoint(HttpFrontEnd(self.service, self.metrics, settings))
        await self.http.start()

    def _capacity_changed(self) -> None:
        """(a pool thread) Engine workers died or came back: health follows."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def update() -> None:
            if self._stopped.is_set():
                return
            serving = self.service.can_serve()
            if not serving:
                log.warning("NOT_SERVING: %s", self.service.capacity_reason())
            await self._set_all(SERVING if serving else NOT_SERVING)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            asyncio.run_coroutine_threadsafe(update(), loop)

    async def _model_changed(self, name: str, serving: bool) -> None:
        if not self._stopped.is_set():
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def _unload_idle_models(self) -> None:
        interval = min(30.0, max(0.1, self.config.budget.keep_alive_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            await self.service.unload_expired()

    async def _set_all(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _bind(self) -> None:
        if self.config.socket_path is not None:
            path = self.config.socket_path
            prepare_socket_path(
                path, self.config.socket_mode, trust_parents=self.config.trust_socket_parents
            )
            with restrictive_umask(self.config.socket_mode):
                self.server.add_insecure_port(f"unix:{path}")
            os.chmod(path, self.config.socket_mode)
            self._socket = BoundSocket.of(path)
            self.addresses.append(f"unix:{path}")
        if self.config.port is not None:
            port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
            self.addresses.append(f"{self.config.host}:{port}")

    async def stop(self, grace: float | None = None) -> None:
        """Flip health to NOT_SERVING, refuse new work, drain in-flight calls, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down: draining in-flight calls (grace %.0fs)", self.config.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.service.accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
        grace = self.config.grace_seconds if grace is None else grace
        # Drain first, with the transport still open: new calls get the service's own
        # UNAVAILABLE ("retry on another instance") while accepted work finishes. A call
        # that reaches a transport already stopping is CANCELLED by gRPC, telling a
        # client nothing.
        deadline = time.monotonic() + grace
        while self.service.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        grace = max(0.0, deadline - time.monotonic())
        # gRPC and HTTP drain together: new calls are refused, in-flight ones finish.
        await asyncio.gather(
            self.server.stop(grace),
            self.http.stop(grace) if self.http is not None else asyncio.sleep(0),
        )
        await asyncio.to_thread(self.scheduler.stop)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        # Only our own socket: a server started on this path while we drained owns it now.
        if self._socket is not None and self._socket.remove() == "replaced":
            log.info("left %s alone: another server has taken the path", self._socket.path)
        log.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def run_server(
    config: ServerConfig, on_serving: Callable[[EmbeddingServer], None] | None = None
) -> int:
    """Serve until SIGTERM/SIGINT; a second signal exits at once. Returns the exit code.

    Under systemd (`Type=notify`) it reports READY=1 once SERVING and STOPPING=1 when a
    signal starts the drain. `on_serving` runs once the server is SERVING."""
    server = EmbeddingServer(config)
    loop = asyncio.get_running_loop()
    signals = 0
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(128 + signum)
        sdnotify.stopping(f"draining in-flight calls (grace {config.grace_seconds:.0f}s)")
        stopping.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
    except EmbedError as error:
        log.error("cannot start: %s", error.message)
        await server.stop(grace=0)
        return 1
    if not stopping:  # a signal during start-up: never report ready
        sdnotify.ready("SERVING on " + ", ".join(server.addresses))
        if on_serving is not None:
            on_serving(server)
    await server.wait()
    # The gRPC server ends mid-stop(): let stop() finish (workers, socket, metrics).
    await asyncio.gather(*stopping)
    return 0
