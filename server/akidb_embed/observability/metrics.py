"""Prometheus metrics: what the server counts, and the optional HTTP endpoint that serves them.

Each server owns its registry (not prometheus_client's global one), so several servers can
live in one process, as they do in the tests. RPC metrics follow the names of
go-grpc-prometheus (`grpc_server_handled_total{grpc_code=...}`), so existing dashboards fit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..runtime.batching import BatchStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
HTTP_LABELS = ("method", "route")


class LoadedModel(Protocol):
    name: str
    memory_bytes: int


class PoolView(Protocol):
    restarts: int
    reruns: int
    failed_batches: int

    @property
    def processes(self) -> int: ...

    @property
    def ready_count(self) -> int: ...


class QueueView(Protocol):
    @property
    def queued_items(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...

    @property
    def pool(self) -> PoolView | None: ...


class ServiceView(Protocol):
    """What the collector reads of the service at scrape time."""

    ready: bool
    accepting: bool

    @property
    def scheduler(self) -> QueueView: ...

    def can_serve(self) -> bool: ...

    def loaded(self) -> Sequence[LoadedModel]: ...


class ServiceCollector(Collector):
    """State read at scrape time: queue depth, loaded models and their memory, serving."""

    def __init__(self, service: ServiceView) -> None:
        self.service = service

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        scheduler = self.service.scheduler
        yield GaugeMetricFamily(
            "akidb_embed_queue_items",
            "Texts waiting for the compute thread.",
            scheduler.queued_items,
        )
        yield GaugeMetricFamily(
            "akidb_embed_queue_tokens",
            "Tokens waiting for the compute thread (RESOURCE_EXHAUSTED past the limit).",
            scheduler.queued_tokens,
        )
        loaded = list(self.service.loaded())
        yield GaugeMetricFamily("akidb_embed_models_loaded", "Models in memory.", len(loaded))
        memory = GaugeMetricFamily(
            "akidb_embed_model_memory_bytes", "Bytes of a loaded model's weights.", labels=["model"]
        )
        for engine in loaded:
            memory.add_metric([engine.name], engine.memory_bytes)
        yield memory
        serving = self.service.can_serve() and self.service.accepting
        yield GaugeMetricFamily(
            "akidb_embed_serving", "1 while the server is SERVING, else 0.", int(serving)
        )
        pool = scheduler.pool
        if pool is not None:
            yield GaugeMetricFamily(
                "akidb_embed_workers_ready",
                "Engine worker processes that can compute now.",
                pool.ready_count,
            )
            yield GaugeMetricFamily(
                "akidb_embed_workers_configured", "Engine worker processes wanted.", pool.processes
            )
            for name, help_text, number in (
                ("akidb_embed_worker_restarts", "Engine workers replaced after dying or hanging.",
                 pool.restarts),
                ("akidb_embed_batch_reruns", "Batches run again after their worker died.",
                 pool.reruns),
                ("akidb_embed_failed_batches", "Batches that killed a worker twice and failed.",
                 pool.failed_batches),
            ):  # fmt: skip
                yield CounterMetricFamily(name, help_text, value=number)


@dataclass(frozen=True)
class RpcName:
    grpc_type: str
    grpc_service: str
    grpc_method: str

    @classmethod
    def parse(cls, full_method: str, request_streaming: bool, response_streaming: bool) -> RpcName:
        service, _, method = full_method.lstrip("/").rpartition("/")
        kinds = {
            (False, False): "unary",
            (False, True): "server_stream",
            (True, False): "client_stream",
            (True, True): "bidi_stream",
        }
        return cls(kinds[request_streaming, response_streaming], service, method)

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.grpc_type, self.grpc_service, self.grpc_method)


class Metrics:
    """Every metric the server exports, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, fds
        self.build = Info("akidb_embed_build", "Version and compute backend.", registry=r)

        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", RPC_LABELS, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by gRPC status code (aborted ones included).",
            (*RPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            RPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received", "Request messages received.", RPC_LABELS, registry=r
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Response messages sent.", RPC_LABELS, registry=r
        )
        self.stream_items = Counter(
            "akidb_embed_stream_items",
            "EmbedStream items answered, by outcome: OK or the item error's status code.",
            ["code"],
            registry=r,
        )

        # The OpenAI-compatible HTTP front end (http_api.py); `route` is the route's path,
        # or "unmatched", so a scan of random paths cannot grow the label set.
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered, by route and status code (refused and failed included).",
            (*HTTP_LABELS, "status"),
            registry=r,
        )
        self.http_seconds = Histogram(
            "http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response.",
            HTTP_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being answered now.", registry=r
        )

        self.texts = Counter("akidb_embed_texts", "Texts embedded.", ["model"], registry=r)
        self.tokens = Counter(
            "akidb_embed_tokens",
            "Tokens embedded, special tokens included; rate() gives tokens/s.",
            ["model"],
            registry=r,
        )
        self.padded_tokens = Counter(
            "akidb_embed_padded_tokens",
            "Tokens computed, padding included; tokens/padded_tokens is batch efficiency.",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "akidb_embed_batch_size",
            "Texts per compute batch.",
            ["model"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "akidb_embed_batch_tokens",
            "Padded tokens (rows x longest row) per compute batch.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "akidb_embed_queue_seconds",
            "Time the oldest text of each batch waited in the queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "akidb_embed_tokenize_seconds",
            "Tokenization time per Embed call or stream item.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "akidb_embed_compute_seconds",
            "Forward-pass time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "akidb_embed_model_load_seconds",
            "Time to load and warm up a model.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "akidb_embed_model_loads",
            "Model loads by outcome (ok, failed).",
            ["model", "outcome"],
            registry=r,
        )

    def watch(self, service: ServiceView) -> None:
        """Export the service's live state (queue, loaded models) at scrape time."""
        self.registry.register(ServiceCollector(service))

    def observe_batch(self, stats: BatchStats) -> None:
        """Scheduler's `on_batch` callback (runs on the compute thread)."""
        model = stats.model
        self.texts.labels(model).inc(stats.rows)
        self.tokens.labels(model).inc(stats.real_tokens)
        self.padded_tokens.labels(model).inc(stats.padded_tokens)
        self.batch_size.labels(model).observe(stats.rows)
        self.batch_tokens.labels(model).observe(stats.padded_tokens)
        self.queue_seconds.labels(model).observe(stats.queue_seconds)
        self.compute_seconds.labels(model).observe(stats.compute_seconds)

    @contextlib.contextmanager
    def time_tokenize(self, model: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.tokenize_seconds.labels(model).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def time_model_load(self, model: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.model_loads.labels(model, "failed").inc()
            raise
        self.model_loads.labels(model, "ok").inc()
        self.model_load_seconds.labels(model).observe(time.perf_counter() - started)

    def stream_items_answered(self, code: str, count: int) -> None:
        self.stream_items.labels(code).inc(count)


class MetricsEndpoint:
    """`GET /metrics` on host:port, from a daemon thread (prometheus_client's own server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
