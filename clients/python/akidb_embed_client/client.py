"""Sync and asyncio clients: `embed(texts) -> vectors`, `embed_stream`, `list_models`, `health`.

Targets: a socket path (`/run/akidb/embed.sock`), `unix:PATH`, or `host:port`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

# Items sent on a stream and not yet answered (the server itself works on 256 at a time).
DEFAULT_MAX_IN_FLIGHT = 512

Truncation = Literal["error", "end", "start"]
_TRUNCATION = {
    None: pb.TRUNCATION_POLICY_UNSPECIFIED,
    "error": pb.TRUNCATION_POLICY_ERROR,
    "end": pb.TRUNCATION_POLICY_END,
    "start": pb.TRUNCATION_POLICY_START,
}
# Bulk messages can be large: match the server's default limit.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def default_target() -> str:
    """The server's default socket: $AKIDB_EMBED_SOCKET, else the per-user runtime path."""
    if env := os.environ.get("AKIDB_EMBED_SOCKET"):
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "akidb-embed" if runtime else Path(f"/tmp/akidb-embed-{os.getuid()}")
    return str(base / "embed.sock")


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
        )


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (N, D) float32, input order
    token_counts: list[int]
    truncated: list[bool]
    space: Space
    model: str

    @classmethod
    def from_proto(cls, response: pb.EmbedResponse) -> EmbedResult:
        dims = response.space.dimensions
        vectors = np.frombuffer(b"".join(e.vector for e in response.embeddings), dtype="<f4")
        return cls(
            vectors=vectors.reshape(len(response.embeddings), dims),
            token_counts=[e.token_count for e in response.embeddings],
            truncated=[e.truncated for e in response.embeddings],
            space=Space.from_proto(response.space),
            model=response.model,
        )


@dataclass(frozen=True)
class StreamResult:
    id: str
    vector: np.ndarray | None
    token_count: int = 0
    truncated: bool = False
    space: Space | None = None
    error: EmbedClientError | None = None

    @classmethod
    def from_proto(cls, response: pb.EmbedStreamResponse) -> StreamResult:
        if response.WhichOneof("result") == "error":
            code = _status_code(response.error.code)
            return cls(response.id, None, error=EmbedClientError(code, response.error.message))
        embedding = response.embedding
        return cls(
            id=response.id,
            vector=np.frombuffer(embedding.vector, dtype="<f4"),
            token_count=embedding.token_count,
            truncated=embedding.truncated,
            space=Space.from_proto(response.space),
        )


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def build_options(
    normalize: bool | None = None,
    dimensions: int = 0,
    truncation: Truncation | None = None,
    prompt_name: str | None = None,
    prompt: str | None = None,
    instruction: str | None = None,
) -> pb.EmbedOptions:
    if sum(x is not None for x in (prompt_name, prompt, instruction)) > 1:
        raise ValueError("give at most one of prompt_name, prompt, instruction")
    options = pb.EmbedOptions(dimensions=dimensions, truncation=_TRUNCATION[truncation])
    if normalize is not None:
        options.normalize = normalize
    if prompt_name is not None:
        options.prompt_name = prompt_name
    elif prompt is not None:
        options.prompt = prompt
    elif instruction is not None:
        options.instruction = instruction
    return options


def _stream_request(
    index: int, item: str | tuple[str, str], model: str, options: pb.EmbedOptions
) -> pb.EmbedStreamRequest:
    item_id, text = (str(index), item) if isinstance(item, str) else item
    request = pb.EmbedStreamRequest(id=item_id, text=text)
    if index == 0:  # model and options are sticky for the rest of the stream
        request.model = model
        request.options.CopyFrom(options)
    return request


class EmbedClient:
    """Blocking client. `embed_stream` keeps the stream full: gRPC sends from the iterable
    as HTTP/2 flow control allows while results come back."""

    def __init__(self, target: str | None = None, timeout: float | None = None) -> None:
        self.target = grpc_target(target)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def embed(
        self, texts: Sequence[str], model: str = "", timeout: float | None = None, **options: Any
    ) -> EmbedResult:
        request = pb.EmbedRequest(model=model, texts=texts, options=build_options(**options))
        try:
            response = self._stub.Embed(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return EmbedResult.from_proto(response)

    def embed_stream(
        self,
        items: Iterable[str | tuple[str, str]],
        model: str = "",
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        **options: Any,
    ) -> Iterator[StreamResult]:
        """Items are texts (ids become their index) or (id, text) pairs; results in order.

        gRPC sends from `items` in its own thread while results come back; at most
        `max_in_flight` items are sent and not yet answered, so a shutdown or an error
        never leaves a huge backlog in the transport."""
        build = build_options(**options)
        slots = threading.Semaphore(max_in_flight)
        finished = threading.Event()

        def requests() -> Iterator[pb.EmbedStreamRequest]:
            for index, item in enumerate(items):
                while not slots.acquire(timeout=0.1):
                    if finished.is_set():
                        return
                yield _stream_request(index, item, model, build)

        call = self._stub.EmbedStream(requests(), timeout=timeout or self.timeout)
        try:
            for response in call:
                slots.release()
                yield StreamResult.from_proto(response)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        finally:
            finished.set()
            call.cancel()

    def list_models(self) -> list[pb.ModelInfo]:
        try:
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None

    def health(self) -> pb.HealthResponse:
        try:
            return self._stub.Health(pb.HealthRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None

    def check(self, service: str = "") -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """The standard grpc.health.v1 status of `service` ("" = the whole server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return self._health.Check(request, timeout=self.timeout).status
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbedClient:
    """asyncio client over grpc.aio."""

    def __init__(self, target: str | None = None, timeout: float | None = None) -> None:
        self.target = grpc_target(target)
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def embed(
        self, texts: Sequence[str], model: str = "", timeout: float | None = None, **options: Any
    ) -> EmbedResult:
        request = pb.EmbedRequest(model=model, texts=texts, options=build_options(**options))
        try:
            response = await self._stub.Embed(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return EmbedResult.from_proto(response)

    async def embed_stream(
        self,
        items: Iterable[str | tuple[str, str]] | AsyncIterable[str | tuple[str, str]],
        model: str = "",
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        **options: Any,
    ) -> AsyncIterator[StreamResult]:
        """As EmbedClient.embed_stream; `items` may be an async iterable."""
        build = build_options(**options)
        slots = asyncio.Semaphore(max_in_flight)

        async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
            index = 0
            if isinstance(items, AsyncIterable):
                async for item in items:
                    await slots.acquire()
                    yield _stream_request(index, item, model, build)
                    index += 1
            else:
                for item in items:
                    await slots.acquire()
                    yield _stream_request(index, item, model, build)
                    index += 1

        call = self._stub.EmbedStream(requests(), timeout=timeout or self.timeout)
        try:
            async for response in call:
                slots.release()
                yield StreamResult.from_proto(response)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list_models(self) -> list[pb.ModelInfo]:
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None
        return list(response.models)

    async def health(self) -> pb.HealthResponse:
        try:
            return await self._stub.Health(pb.HealthRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise EmbedClientError.from_rpc_error(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
