"""Sync and asyncio clients: `embed(texts) -> vectors`, `embed_stream`, `list_models`, `health`.

Targets: a socket path (`/run/akidb/embed.sock`), `unix:PATH`, or `host:port`; none means
the server's default socket (`$AKIDB_EMBED_SOCKET`, else the per-user runtime path).

Deadlines: `embed`, `list_models`, `health` and `check` default to `DEFAULT_TIMEOUT`
seconds (pass `timeout=` per client or per call; `None` waits for ever). A bulk stream has
no deadline by default: it runs as long as its input does.

`embed_stream` coalesces items into messages by itself: whatever the caller's iterable has
produced is sent together, up to `max_items_per_message` items or `max_chars_per_message`
characters, and a message goes out as soon as the input pauses. No tuning is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from .paths import default_socket_path
from .replicas import (
    PoolCounters,
    PoolStream,
    bridge_to_async,
    count_endpoints,
    is_pool_target,
    list_target,
    service_config,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Items sent on a stream and not yet answered (the server works on 4096 at a time).
DEFAULT_MAX_IN_FLIGHT = 8192
# What one stream message carries at most.
DEFAULT_MAX_ITEMS_PER_MESSAGE = 256
DEFAULT_MAX_CHARS_PER_MESSAGE = 1 << 20
# Seconds a unary call may take unless told otherwise.
DEFAULT_TIMEOUT = 30.0

Truncation = Literal["error", "end", "start", "chunk"]
_TRUNCATION = {
    None: pb.TRUNCATION_POLICY_UNSPECIFIED,
    "error": pb.TRUNCATION_POLICY_ERROR,
    "end": pb.TRUNCATION_POLICY_END,
    "start": pb.TRUNCATION_POLICY_START,
    "chunk": pb.TRUNCATION_POLICY_CHUNK,
}
Encoding = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
_ENCODING: dict[str | None, pb.Encoding.ValueType] = {
    None: pb.ENCODING_UNSPECIFIED,
    "float32": pb.ENCODING_FLOAT32,
    "float16": pb.ENCODING_FLOAT16,
    "int8": pb.ENCODING_INT8,
    "uint8": pb.ENCODING_UINT8,
    "binary": pb.ENCODING_BINARY,
    "ubinary": pb.ENCODING_UBINARY,
}
# Per encoding: the numpy dtype of a row's values and whether a row is packed bits.
_DTYPES: dict[int, tuple[str, bool]] = {
    pb.ENCODING_UNSPECIFIED: ("<f4", False),
    pb.ENCODING_FLOAT32: ("<f4", False),
    pb.ENCODING_FLOAT16: ("<f2", False),
    pb.ENCODING_INT8: ("i1", False),
    pb.ENCODING_UINT8: ("u1", False),
    pb.ENCODING_BINARY: ("i1", True),
    pb.ENCODING_UBINARY: ("u1", True),
}
# Bulk messages can be large: match the server's default limit.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class Options(TypedDict, total=False):
    """Per-request options (the server's EmbedOptions). At most one of prompt_name,
    prompt and instruction."""

    normalize: bool  # L2-normalise (default true)
    dimensions: int  # Matryoshka size; 0 = native
    truncation: Truncation  # "end" (default), "start", "error" or "chunk"
    encoding: Encoding  # "float32" (default), "float16", "int8", "uint8", "binary", "ubinary"
    chunk_tokens: int  # truncation="chunk": tokens per window; 0 = the model's maximum
    chunk_overlap_tokens: int  # truncation="chunk": tokens consecutive windows share
    prompt_name: str  # a prompt the model ships, e.g. "query"
    prompt: str  # a literal prefix
    instruction: str  # formatted with the model's instruction template


def default_target() -> str:
    """The server's default socket: $AKIDB_EMBED_SOCKET, else the per-user runtime path."""
    return str(default_socket_path())


def grpc_target(target: str | None) -> str:
    target = target or default_target()
    if target.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return target
    if "/" in target or target.endswith(".sock"):
        return "unix:" + os.path.abspath(target)
    return target


class EmbedClientError(Exception):
    """The server's status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> EmbedClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")


@dataclass(frozen=True)
class Space:
    model_id: str
    revision: str
    dimensions: int
    pooling: str
    normalized: bool
    dtype: str
    fingerprint: str
    encoding: str = "float32"
    ranges_id: str = ""  # int8/uint8: the QuantizationRanges.id the vectors used

    @classmethod
    def from_proto(cls, space: pb.EmbeddingSpace) -> Space:
        return cls(
            model_id=space.model_id,
            revision=space.revision,
            dimensions=space.dimensions,
            pooling=pb.Pooling.Name(space.pooling).removeprefix("POOLING_").lower(),
            normalized=space.normalized,
            dtype=space.dtype,
            fingerprint=space.fingerprint,
            encoding=_encoding_name(space.encoding),
            ranges_id=space.ranges_id,
        )


def _encoding_name(value: int) -> str:
    if value == pb.ENCODING_UNSPECIFIED:
        return "float32"
    return pb.Encoding.Name(value).removeprefix("ENCODING_").lower()  # type: ignore[arg-type]


def _rows(batch: pb.EmbeddingBatch) -> np.ndarray:
    """The batch's vectors as one array over the message's buffer, typed per encoding:
    (N, D) float32 / float16 / int8 / uint8, or (N, ceil(D / 8)) int8 / uint8 packed sign
    bits for binary / ubinary (numpy `unpackbits` of the uint8 view gives the bits)."""
    dtype, bits = _DTYPES.get(batch.encoding, ("<f4", False))
    width = (batch.dimensions + 7) // 8 if bits else batch.dimensions
    vectors = np.frombuffer(batch.vectors, dtype=dtype)
    return vectors.reshape(-1, width) if width else vectors.reshape(0, 0)


class Chunk(NamedTuple):
    """One window of a chunked text (truncation="chunk"): its index in the text and its
    ranges there: `text[char_start:char_end]` (code points, Python) and
    `text.encode()[byte_start:byte_end]` (UTF-8 bytes)."""

    chunk_index: int
    char_start: int
    char_end: int
    byte_start: int
    byte_end: int


def _chunks(batch: pb.EmbeddingBatch) -> list[Chunk]:
    return [
        Chunk(*row)
        for row in zip(
            batch.chunk_index,
            batch.char_start,
            batch.char_end,
            batch.byte_start,
            batch.byte_end,
            strict=True,
        )
    ]


@dataclass(frozen=True)
class EmbedResult:
    # (rows, D) in the requested encoding (float32 by default; see `_rows`), input order:
    # one row per text, or with truncation="chunk" `chunk_counts[i]` rows per text.
    vectors: np.ndarray
    token_counts: list[int]  # per row
    truncated: list[bool]  # per row
    space: Space
    model: str
    # truncation="chunk": rows per text, and each row's window.
    chunk_counts: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    @classmethod
    def from_proto(cls, response: pb.EmbedResponse) -> EmbedResult:
        batch = response.embeddings
        return cls(
            vectors=_rows(batch),
            token_counts=list(batch.token_counts),
            truncated=list(batch.truncated),
            space=Space.from_proto(response.space),
            model=response.model,
            chunk_counts=list(batch.chunk_counts),
            chunks=_chunks(batch) if batch.chunk_counts else [],
        )

    def text_rows(self, index: int) -> slice:
        """The rows of text `index`: `vectors[result.text_rows(i)]` (chunked or not)."""
        if not self.chunk_counts:
            return slice(index, index + 1)
        start = sum(self.chunk_counts[:index])
        return slice(start, start + self.chunk_counts[index])


class StreamResult(NamedTuple):
    """One stream item's outcome: its vector, or its error. With truncation="chunk",
    `vector` holds the item's windows as rows (k, D), `chunks` their ranges and
    `token_count` the tokens of all of them."""

    id: str
    vector: np.ndarray | None
    token_count: int = 0
    truncated: bool = False
    space: Space | None = None
    error: EmbedClientError | None = None
    chunks: list[Chunk] | None = None


@dataclass(frozen=True)
class ServerLimits:
    max_texts_per_request: int
    max_chars_per_text: int
    max_chars_per_request: int
    max_queued_tokens: int
    stream_window: int
    max_message_bytes: int


@dataclass(frozen=True)
class ModelHealth:
    name: str
    status: str  # "SERVING" or "NOT_SERVING"
    reason: str


@dataclass(frozen=True)
class Health:
    status: str  # "SERVING" or "NOT_SERVING"
    version: str
    uptime_seconds: float
    backend: str
    models: list[ModelHealth]
    limits: ServerLimits
    workers_ready: int
    workers_configured: int

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"

    @classmethod
    def from_proto(cls, response: pb.HealthResponse) -> Health:
        def status(value: int) -> str:
            return pb.ServingStatus.Name(value).removeprefix("SERVING_STATUS_")  # type: ignore[arg-type]

        limits = response.limits
        return cls(
            status=status(response.status),
            version=response.version,
            uptime_seconds=response.uptime_seconds,
            backend=response.backend,
            models=[ModelHealth(m.name, status(m.status), m.reason) for m in response.models],
            limits=ServerLimits(
                max_texts_per_request=limits.max_texts_per_request,
                max_chars_per_text=limits.max_chars_per_text,
                max_chars_per_request=limits.max_chars_per_request,
                max_queued_tokens=limits.max_queued_tokens,
                stream_window=limits.stream_window,
                max_message_bytes=limits.max_message_bytes,
            ),
            workers_ready=response.workers_ready,
            workers_configured=response.workers_configured,
        )


@dataclass(frozen=True)
class QuantizationRanges:
    """int8/uint8 ranges of one output size: min and max per dimension."""

    dimensions: int
    normalized: bool
    min: np.ndarray  # float32 (D,)
    max: np.ndarray
    id: str
    calibration_texts: int

    @classmethod
    def from_proto(cls, ranges: pb.QuantizationRanges) -> QuantizationRanges:
        return cls(
            dimensions=ranges.dimensions,
            normalized=ranges.normalized,
            min=np.asarray(ranges.min, dtype=np.float32),
            max=np.asarray(ranges.max, dtype=np.float32),
            id=ranges.id,
            calibration_texts=ranges.calibration_texts,
        )

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """int8 or uint8 rows back to approximate float32 values, as sentence-transformers
        does (min + bucket * step)."""
        steps = (self.max - self.min) / 255
        steps = np.where(steps == 0, 1, steps)
        values = codes.astype(np.float64)
        if codes.dtype == np.int8:
            values += 128
        return (values * steps + self.min).astype(np.float32)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    revision: str
    state: str  # "loaded", "on_disk", "not_downloaded", "loading", "failed"
    state_reason: str
    dimensions: int
    matryoshka_dimensions: list[int]
    max_tokens: int
    pooling: str
    prompts: dict[str, str]
    dtype: str
    memory_bytes: int
    size_on_disk_bytes: int
    architecture: str
    is_default: bool
    # int8/uint8 ranges for the native and Matryoshka sizes (once the model is loaded).
    quantization_ranges: list[QuantizationRanges] = field(default_factory=list)
    self_check: str = ""  # what the load-time self-check found

    def ranges(self, dimensions: int = 0) -> QuantizationRanges | None:
        size = dimensions or self.dimensions
        return next((r for r in self.quantization_ranges if r.dimensions == size), None)

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=info.name,
            source=info.source,
            revision=info.revision,
            state=pb.ModelState.Name(info.state).removeprefix("MODEL_STATE_").lower(),
            state_reason=info.state_reason,
            dimensions=info.dimensions,
            matryoshka_dimensions=list(info.matryoshka_dimensions),
            max_tokens=info.max_tokens,
            pooling=pb.Pooling.Name(info.pooling).removeprefix("POOLING_").lower(),
            prompts=dict(info.prompts),
            dtype=info.dtype,
            memory_bytes=info.memory_bytes,
            size_on_disk_bytes=info.size_on_disk_bytes,
            architecture=info.architecture,
            is_default=info.is_default,
            quantization_ranges=[
                QuantizationRanges.from_proto(r) for r in info.quantization_ranges
            ],
            self_check=info.self_check,
        )


def _status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def build_options(**options: Unpack[Options]) -> pb.EmbedOptions:
    known = Options.__annotations__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    prompts = [k for k in ("prompt_name", "prompt", "instruction") if options.get(k) is not None]
    if len(prompts) > 1:
        raise ValueError("give at most one of prompt_name, prompt, instruction")
    encoding = options.get("encoding")
    if encoding not in _ENCODING:
        raise ValueError(
            f"encoding {encoding!r} is not known; use one of "
            + ", ".join(str(e) for e in _ENCODING if e)
        )
    built = pb.EmbedOptions(
        dimensions=options.get("dimensions", 0),
        truncation=_TRUNCATION[options.get("truncation")],
        encoding=_ENCODING[encoding],
        chunk_tokens=options.get("chunk_tokens", 0),
        chunk_overlap_tokens=options.get("chunk_overlap_tokens", 0),
    )
    if options.get("normalize") is not None:
        built.normalize = options["normalize"]
    if prompts:
        setattr(built, prompts[0], options[prompts[0]])  # type: ignore[literal-required]
    return built


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "texts must be a sequence of strings, not one string: embed([text]) for a single text"
        )
    return list(texts)


def _as_pair(index: int, item: str | tuple[str, str]) -> tuple[str, str]:
    if isinstance(item, str):
        return str(index), item
    item_id, text = item
    return item_id, text


@dataclass
class _StreamState:
    """What one stream's sender and receiver share (guarded by `cond`)."""

    max_in_flight: int
    max_items: int
    max_chars: int
    model: str
    options: pb.EmbedOptions
    pending: deque[tuple[str, str]] = field(default_factory=deque)
    in_flight: int = 0  # taken from the input, not yet answered
    input_done: bool = False
    input_error: BaseException | None = None
    finished: bool = False
    first: bool = True
    space: Space | None = None

    def take(self) -> pb.EmbedStreamRequest:
        """(lock held, pending not empty) The next message: what is there, up to limits."""
        ids: list[str] = []
        texts: list[str] = []
        chars = 0
        pending = self.pending
        while pending and len(ids) < self.max_items:
            if ids and chars + len(pending[0][1]) > self.max_chars:
                break
            item_id, text = pending.popleft()
            ids.append(item_id)
            texts.append(text)
            chars += len(text)
        request = pb.EmbedStreamRequest(ids=ids, texts=texts)
        if self.first:  # model and options are sticky for the rest of the stream
            self.first = False
            request.model = self.model
            request.options.CopyFrom(self.options)
        return request

    def results(self, response: pb.EmbedStreamResponse) -> list[StreamResult]:
        if response.HasField("space"):
            self.space = Space.from_proto(response.space)
        return decode_stream_results(response, self.space)


def decode_stream_results(
    response: pb.EmbedStreamResponse, space: Space | None
) -> list[StreamResult]:
    """One response message to its items' results, in order; `space` is the last one the
    stream received (this response's, if it carried one)."""
    ids = response.ids
    batch = response.embeddings
    vectors = _rows(batch)
    counts = batch.token_counts
    truncated = batch.truncated
    if batch.chunk_counts:
        return _chunked_results(response, vectors, space)
    if not response.errors:
        return [
            StreamResult(item_id, vector, count, cut, space)
            for item_id, vector, count, cut in zip(ids, vectors, counts, truncated, strict=True)
        ]
    failed = {e.index: EmbedClientError(_status_code(e.code), e.message) for e in response.errors}
    out: list[StreamResult] = []
    row = 0
    for index, item_id in enumerate(ids):
        error = failed.get(index)
        if error is not None:
            out.append(StreamResult(item_id, None, error=error))
        else:
            out.append(StreamResult(item_id, vectors[row], counts[row], truncated[row], space))
            row += 1
    return out


def _channel_options(target: str) -> list[tuple[str, object]]:
    if not is_pool_target(target):
        return list(_CHANNEL_OPTIONS)
    return [
        *_CHANNEL_OPTIONS,
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
    ]


def resolve_target(target: str | Sequence[str] | None) -> str:
    """A grpc target: a list of host:port addresses becomes one `ipv4:`/`ipv6:` list."""
    if target is not None and not isinstance(target, str):
        return list_target(list(target))
    return grpc_target(target)


def _chunked_results(
    response: pb.EmbedStreamResponse, vectors: np.ndarray, space: Space | None
) -> list[StreamResult]:
    """truncation="chunk": each item without error owns `chunk_counts[k]` rows."""
    batch = response.embeddings
    failed = {e.index: EmbedClientError(_status_code(e.code), e.message) for e in response.errors}
    chunks = _chunks(batch)
    sizes = iter(batch.chunk_counts)
    out: list[StreamResult] = []
    row = 0
    for index, item_id in enumerate(response.ids):
        error = failed.get(index)
        if error is not None:
            out.append(StreamResult(item_id, None, error=error))
            continue
        size = next(sizes)
        rows = slice(row, row + size)
        row += size
        out.append(
            StreamResult(
                item_id,
                vectors[rows],
                sum(batch.token_counts[rows]),
                False,
                space,
                chunks=chunks[rows],
            )
        )
    return out


class EmbedClient:
    """Blocking client. `embed_stream` keeps the stream full: items go out in messages as
    HTTP/2 flow control allows while results come back.

    `target` may name a pool of replicas: a list of host:port addresses, or a
    `dns:///name:port` target. Calls then spread by round robin, unary calls are retried on
    UNAVAILABLE, and `embed_stream` runs over several sub-streams that fail over without
    losing an item (replicas.py); `counters` shows what that took."""

    def __init__(
        self, target: str | Sequence[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.pool = is_pool_target(self.target)
        self.counters = PoolCounters()
        self._channel = grpc.insecure_channel(self.target, options=_channel_options(self.target))
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # A pool starts connecting to every replica now, so that round_robin has them all
        # ready by the first call and spreads the first stream's sub-streams over them.
        self._ready = grpc.channel_ready_future(self._channel) if self.pool else None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def embed(
        self,
        texts: Sequence[str],
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> EmbedResult:
        request = pb.EmbedRequest(
            model=model, texts=_check_texts(texts), options=build_options(**options)
        )
        try:
            response = self._stub.Embed(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return EmbedResult.from_proto(response)

    def embed_stream(
        self,
        items: Iterable[str | tuple[str, str]],
        model: str = "",
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_items_per_message: int = DEFAULT_MAX_ITEMS_PER_MESSAGE,
        max_chars_per_message: int = DEFAULT_MAX_CHARS_PER_MESSAGE,
        streams: int | None = None,
        **options: Unpack[Options],
    ) -> Iterator[StreamResult]:
        """Items are texts (ids become their index) or (id, text) pairs; results in order.

        A thread reads `items` while gRPC sends what it has read, in messages, and results
        come back; at most `max_in_flight` items are read and not yet answered, so a
        shutdown or an error never leaves a huge backlog in the transport. `timeout`
        bounds the whole stream (default: none).

        On a pool, the items go over `streams` concurrent sub-streams (default: one per
        replica the target names now, at most 8) and an item whose replica fails or
        drains is sent again on another; each id is still answered once, in order."""
        if isinstance(items, (str, bytes)):
            raise TypeError("items must be an iterable of texts or (id, text) pairs")
        if self.pool:
            if self._ready is not None:
                # Wait a little for a first replica; none ready is reported by the stream.
                with contextlib.suppress(grpc.FutureTimeoutError):
                    self._ready.result(timeout=2.0)
            return _pool_stream(
                self._stub,
                self.target,
                self.counters,
                model,
                build_options(**options),
                timeout,
                (max_in_flight, max_items_per_message, max_chars_per_message),
                streams,
            ).run(_as_pair(index, item) for index, item in enumerate(items))
        return self._embed_stream(
            items,
            model,
            timeout,
            max_in_flight,
            max_items_per_message,
            max_chars_per_message,
            build_options(**options),
        )

    def _embed_stream(
        self,
        items: Iterable[str | tuple[str, str]],
        model: str,
        timeout: float | None,
        max_in_flight: int,
        max_items_per_message: int,
        max_chars_per_message: int,
        options: pb.EmbedOptions,
    ) -> Iterator[StreamResult]:
        state = _StreamState(
            max_in_flight, max_items_per_message, max_chars_per_message, model, options
        )
        cond = threading.Condition()

        def read() -> None:
            try:
                for index, item in enumerate(items):
                    pair = _as_pair(index, item)
                    with cond:
                        while state.in_flight >= state.max_in_flight and not state.finished:
                            cond.wait()
                        if state.finished:
                            return
                        state.pending.append(pair)
                        state.in_flight += 1
                        if len(state.pending) == 1:
                            cond.notify_all()
            except BaseException as exc:  # the caller's iterable failed: end the stream
                state.input_error = exc
            with cond:
                state.input_done = True
                cond.notify_all()

        def requests() -> Iterator[pb.EmbedStreamRequest]:
            while True:
                with cond:
                    while not state.pending and not state.input_done and not state.finished:
                        cond.wait()
                    if state.finished or not state.pending:
                        return
                    request = state.take()
                yield request

        reader = threading.Thread(target=read, name="embed-stream-input", daemon=True)
        reader.start()
        call = self._stub.EmbedStream(requests(), timeout=timeout)
        try:
            for response in call:
                with cond:
                    state.in_flight -= len(response.ids)
                    cond.notify_all()
                yield from state.results(response)
            if state.input_error is not None:
                raise state.input_error
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        finally:
            with cond:
                state.finished = True
                cond.notify_all()
            call.cancel()

    def list_models(self, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return [ModelInfo.from_proto(m) for m in response.models]

    def health(self, timeout: float | None = None) -> Health:
        try:
            response = self._stub.Health(pb.HealthRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return Health.from_proto(response)

    def check(self, service: str = "", timeout: float | None = None) -> str:
        """The standard grpc.health.v1 status of `service` ("" = the whole server):
        "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = self._health.Check(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        if self._ready is not None:
            self._ready.cancel()
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pool_stream(
    stub: pb_grpc.EmbeddingServiceStub,
    target: str,
    counters: PoolCounters,
    model: str,
    options: pb.EmbedOptions,
    timeout: float | None,
    limits: tuple[int, int, int],
    streams: int | None,
) -> PoolStream:
    """A pool stream; `limits` are (max_in_flight, max items, max chars per message), and
    `streams` defaults to one per replica the target names now."""
    max_in_flight, max_items, max_chars = limits
    return PoolStream(
        stub,
        model,
        options,
        timeout=timeout,
        max_in_flight=max_in_flight,
        max_items=max_items,
        max_chars=max_chars,
        streams=streams if streams is not None else count_endpoints(target),
        counters=counters,
    )


def _pairs(
    items: Iterable[str | tuple[str, str]] | AsyncIterable[str | tuple[str, str]],
) -> Iterable[tuple[str, str]] | AsyncIterable[tuple[str, str]]:
    """Items as (id, text) pairs, a text's id its index; sync stays sync, async async."""
    if isinstance(items, AsyncIterable):

        async def pairs() -> AsyncIterator[tuple[str, str]]:
            index = 0
            async for item in items:
                yield _as_pair(index, item)
                index += 1

        return pairs()
    return (_as_pair(index, item) for index, item in enumerate(items))


class AsyncEmbedClient:
    """asyncio client over grpc.aio: the same methods as EmbedClient."""

    def __init__(
        self, target: str | Sequence[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.pool = is_pool_target(self.target)
        self.counters = PoolCounters()
        self._channel = grpc.aio.insecure_channel(
            self.target, options=_channel_options(self.target)
        )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # Pool streams run PoolStream's threads on a blocking channel of their own (made on
        # the first one): the failover bookkeeping is the blocking client's, shared.
        self._blocking: grpc.Channel | None = None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def embed(
        self,
        texts: Sequence[str],
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> EmbedResult:
        request = pb.EmbedRequest(
            model=model, texts=_check_texts(texts), options=build_options(**options)
        )
        try:
            response = await self._stub.Embed(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return EmbedResult.from_proto(response)

    async def embed_stream(
        self,
        items: Iterable[str | tuple[str, str]] | AsyncIterable[str | tuple[str, str]],
        model: str = "",
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_items_per_message: int = DEFAULT_MAX_ITEMS_PER_MESSAGE,
        max_chars_per_message: int = DEFAULT_MAX_CHARS_PER_MESSAGE,
        streams: int | None = None,
        **options: Unpack[Options],
    ) -> AsyncIterator[StreamResult]:
        """As EmbedClient.embed_stream; `items` may be an async iterable. On a pool the
        stream fails over as EmbedClient's does (replicas.py), each id answered once."""
        if isinstance(items, (str, bytes)):
            raise TypeError("items must be an iterable of texts or (id, text) pairs")
        if self.pool:
            if self._blocking is None:
                self._blocking = grpc.insecure_channel(
                    self.target, options=_channel_options(self.target)
                )
                with contextlib.suppress(grpc.FutureTimeoutError):
                    await asyncio.to_thread(grpc.channel_ready_future(self._blocking).result, 2.0)
            stream = _pool_stream(
                pb_grpc.EmbeddingServiceStub(self._blocking),
                self.target,
                self.counters,
                model,
                build_options(**options),
                timeout,
                (max_in_flight, max_items_per_message, max_chars_per_message),
                streams,
            )
            async for result in bridge_to_async(stream, _pairs(items)):
                yield result
            return
        state = _StreamState(
            max_in_flight,
            max_items_per_message,
            max_chars_per_message,
            model,
            build_options(**options),
        )
        cond = asyncio.Condition()

        async def put(index: int, item: str | tuple[str, str]) -> bool:
            pair = _as_pair(index, item)
            async with cond:
                await cond.wait_for(lambda: state.in_flight < state.max_in_flight or state.finished)
                if state.finished:
                    return False
                state.pending.append(pair)
                state.in_flight += 1
                if len(state.pending) == 1:
                    cond.notify_all()
            return True

        async def read() -> None:
            try:
                if isinstance(items, AsyncIterable):
                    index = 0
                    async for item in items:
                        if not await put(index, item):
                            return
                        index += 1
                else:
                    for index, item in enumerate(items):
                        if not await put(index, item):
                            return
                        if index % 64 == 63:
                            await asyncio.sleep(0)  # let the sender take what is there
            except Exception as exc:
                state.input_error = exc
            finally:
                async with cond:
                    state.input_done = True
                    cond.notify_all()

        async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
            while True:
                async with cond:
                    await cond.wait_for(
                        lambda: bool(state.pending) or state.input_done or state.finished
                    )
                    if state.finished or not state.pending:
                        return
                    request = state.take()
                yield request

        reader = asyncio.ensure_future(read())
        call = self._stub.EmbedStream(requests(), timeout=timeout)
        try:
            async for response in call:
                async with cond:
                    state.in_flight -= len(response.ids)
                    cond.notify_all()
                for result in state.results(response):
                    yield result
            if state.input_error is not None:
                raise state.input_error
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        finally:
            async with cond:
                state.finished = True
                cond.notify_all()
            reader.cancel()
            call.cancel()

    async def list_models(self, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout)
            )
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return [ModelInfo.from_proto(m) for m in response.models]

    async def health(self, timeout: float | None = None) -> Health:
        try:
            response = await self._stub.Health(pb.HealthRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return Health.from_proto(response)

    async def check(self, service: str = "", timeout: float | None = None) -> str:
        """As EmbedClient.check."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._health.Check(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self._channel.close()
        if self._blocking is not None:
            self._blocking.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
