"""What every RPC gets on its way in and out, whatever the service:

- a request id: the client's `x-request-id` metadata if it sent a usable one, else a new one;
  set in the logging context for every line the call causes, and echoed in initial metadata;
- metrics: started / handled by status code (aborted and cancelled calls included) / latency
  / messages;
- a precise status for bytes that are not a valid request message (INVALID_ARGUMENT, where
  grpc would answer UNKNOWN), and INTERNAL with the request id for a server bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from ..observability.logs import REQUEST_ID
from ..observability.metrics import Metrics, RpcName

log = logging.getLogger(__name__)
# One line per RPC: method, status, items, tokens, milliseconds (`extra` fields in JSON).
access_log = logging.getLogger("akidb_embed.access")
# Probes call these every few seconds: their access lines are DEBUG, not INFO.
QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})
REQUEST_ID_KEY = "x-request-id"
# What we accept from a client as its request id; anything else gets a fresh one.
DEADLINE_SLACK_SECONDS = 0.1
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

Deserializer = Callable[[bytes], Any]


class Malformed:
    """Stands in for a request message that did not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedMessage(Exception):
    """Raised to the servicer from a request stream when a message did not parse."""


def tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """A deserializer that returns `Malformed` instead of raising, so the call can be
    answered INVALID_ARGUMENT instead of grpc's UNKNOWN."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Malformed(str(exc))

    return deserialize


def malformed_message(reason: str, name: RpcName) -> str:
    return (
        f"the request is not a valid message for {name.grpc_service}/{name.grpc_method} "
        f"({reason}); send a message serialized from the service's .proto"
    )


def request_id_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


def status_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with, as far as the handler can tell."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        # The client went away, or its deadline passed: grpc cancels the handler, or closes
        # a streaming handler's generator before its end.
        remaining = context.time_remaining()
        # The client gives up at its deadline, a moment before the server's copy of it.
        expired = remaining is not None and remaining < DEADLINE_SLACK_SECONDS
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class _Call:
    """Book-keeping for one RPC: its id, its clock, its metrics."""

    def __init__(self, metrics: Metrics, name: RpcName, context: grpc.aio.ServicerContext) -> None:
        self.metrics = metrics
        self.name = name
        self.context = context
        self.started = time.perf_counter()
        self.request_id = request_id_from(context.invocation_metadata())
        # Texts answered (stream items with an error included) and their tokens.
        self.items = 0
        self.tokens = 0

    async def begin(self) -> None:
        # The handler runs in this task, and the tasks it starts copy this context.
        REQUEST_ID.set(self.request_id)
        self.metrics.rpc_started.labels(*self.name.labels).inc()
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    def received(self) -> None:
        self.metrics.msg_received.labels(*self.name.labels).inc()

    def sent(self, response: Any = None) -> None:
        self.metrics.msg_sent.labels(*self.name.labels).inc()
        if response is not None:
            items, tokens = tally(response)
            self.items += items
            self.tokens += tokens

    async def fail(self, error: BaseException) -> None:
        """Turn what escaped the handler into a precise status (raises)."""
        if isinstance(error, MalformedMessage):
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
            log.error("%s failed", self.name.grpc_method, exc_info=error)
            await self.context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error in {self.name.grpc_method} (request id {self.request_id}); "
                "this is a server bug: report it with the server's log",
            )
        raise error

    @contextlib.asynccontextmanager
    async def observed(self) -> AsyncIterator[None]:
        """Wraps the handler: begin, then turn what escapes into a status, then count it."""
        error: BaseException | None = None
        try:
            await self.begin()
            yield
        except BaseException as exc:
            error = exc
            try:
                await self.fail(exc)
            except BaseException as final:
                error = final
                raise
        finally:
            self.finish(error)

    def finish(self, error: BaseException | None) -> None:
        code = status_of(self.context, error)
        labels = self.name.labels
        self.metrics.rpc_handled.labels(*labels, code.name).inc()
        seconds = time.perf_counter() - self.started
        self.metrics.rpc_seconds.labels(*labels).observe(seconds)
        ms = round(seconds * 1000, 1)
        method = f"{self.name.grpc_service}/{self.name.grpc_method}"
        access_log.log(
            logging.DEBUG if self.name.grpc_service in QUIET_SERVICES else logging.INFO,
            "%s %s items=%d tokens=%d %.1f ms",
            method,
            code.name,
            self.items,
            self.tokens,
            ms,
            extra={
                "request_id": self.request_id,
                "method": method,
                "status": code.name,
                "items": self.items,
                "tokens": self.tokens,
                "ms": ms,
            },
        )


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED
        name = RpcName.parse(
            handler_call_details.method, handler.request_streaming, handler.response_streaming
        )
        deserializer = tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(name, handler.unary_unary), deserializer, serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(name, handler.unary_stream, requests_stream=False),
                deserializer,
                serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(name, handler.stream_unary), deserializer, serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(name, handler.stream_stream, requests_stream=True),
            deserializer,
            serializer,
        )

    def _unary_unary(self, name: RpcName, behavior: Any) -> Any:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self.metrics, name, context)
            async with call.observed():
                if isinstance(request, Malformed):
                    raise MalformedMessage(malformed_message(request.reason, name))
                call.received()
                response = await behavior(request, context)
                call.sent(response)
                return response

        return handle

    def _stream_unary(self, name: RpcName, behavior: Any) -> Any:
        async def handle(
            request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            call = _Call(self.metrics, name, context)
            async with call.observed():
                response = await behavior(_checked(request_iterator, call), context)
                call.sent(response)
                return response

        return handle

    def _streaming(self, name: RpcName, behavior: Any, requests_stream: bool) -> Any:
        """Response-streaming handlers come in two shapes, async generators and coroutines
        that call `context.write`; grpc tells them apart by their type, so keep it."""

        def arguments(request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
            if requests_stream:
                return _checked(request, call)
            if isinstance(request, Malformed):
                raise MalformedMessage(malformed_message(request.reason, name))
            call.received()
            return request

        if inspect.isasyncgenfunction(behavior):

            async def generate(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                call = _Call(self.metrics, name, context)
                async with call.observed():
                    async for response in behavior(arguments(request, context, call), context):
                        call.sent(response)
                        yield response

            return generate

        async def write(request: Any, context: grpc.aio.ServicerContext) -> None:
            call = _Call(self.metrics, name, context)
            async with call.observed():
                await behavior(arguments(request, context, call), context)

        return write


def tally(response: Any) -> tuple[int, int]:
    """(texts answered, tokens) in one response message: an EmbedResponse's rows, or one
    EmbedStreamResponse's items (an item with its own error counts as answered, with no
    tokens). Other messages count nothing."""
    embeddings = getattr(response, "embeddings", None)
    if embeddings is None:
        return 0, 0
    ids = getattr(response, "ids", None)
    counts = getattr(embeddings, "token_counts", None)
    if ids is not None:  # a stream message: every id is answered, by a row or an error
        return len(ids), sum(counts or ())
    if counts is not None:  # a unary EmbedResponse: one row per text
        return len(counts), int(getattr(response, "total_tokens", 0) or sum(counts))
    return 0, 0


async def _checked(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise MalformedMessage(malformed_message(request.reason, call.name))
        call.received()
        yield request
