"""The gRPC layer: decode the request, call the domain service, encode the response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from .engine import EmbeddingSpace, EmbedOptions, PromptKind
from .errors import DeadlineExceeded, EmbedError, ErrorKind, InvalidArgument
from .metrics import Metrics
from .models.base import Pooling
from .service import EmbeddedText, EmbeddingService, ModelState
from .tokenization import Truncation

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

_TRUNCATION = {
    pb.TRUNCATION_POLICY_UNSPECIFIED: Truncation.END,
    pb.TRUNCATION_POLICY_END: Truncation.END,
    pb.TRUNCATION_POLICY_START: Truncation.START,
    pb.TRUNCATION_POLICY_ERROR: Truncation.ERROR,
}
_PROMPT_KIND = {
    "prompt_name": PromptKind.NAME,
    "prompt": PromptKind.LITERAL,
    "instruction": PromptKind.INSTRUCTION,
}
POOLING = {
    Pooling.MEAN: pb.POOLING_MEAN,
    Pooling.CLS: pb.POOLING_CLS,
    Pooling.LAST_TOKEN: pb.POOLING_LAST_TOKEN,
}
MODEL_STATE = {
    ModelState.LOADED: pb.MODEL_STATE_LOADED,
    ModelState.ON_DISK: pb.MODEL_STATE_ON_DISK,
    ModelState.NOT_DOWNLOADED: pb.MODEL_STATE_NOT_DOWNLOADED,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}


def decode_options(options: pb.EmbedOptions) -> EmbedOptions:
    truncation = _TRUNCATION.get(options.truncation)
    if truncation is None:
        raise InvalidArgument(
            f"truncation={options.truncation} is not a TruncationPolicy; use ERROR, END or START"
        )
    which = options.WhichOneof("prompt_choice")
    return EmbedOptions(
        normalize=options.normalize if options.HasField("normalize") else True,
        dimensions=options.dimensions,
        truncation=truncation,
        prompt_kind=_PROMPT_KIND[which] if which else PromptKind.NONE,
        prompt_value=getattr(options, which) if which else "",
    )


def encode_space(space: EmbeddingSpace) -> pb.EmbeddingSpace:
    return pb.EmbeddingSpace(
        model_id=space.model_id,
        revision=space.revision,
        dimensions=space.dimensions,
        pooling=POOLING[space.pooling],
        normalized=space.normalized,
        dtype=space.dtype,
        fingerprint=space.fingerprint,
    )


def encode_embedding(embedded: EmbeddedText) -> pb.Embedding:
    return pb.Embedding(
        vector=embedded.vector.astype("<f4", copy=False).tobytes(),
        dimensions=embedded.vector.shape[0],
        token_count=embedded.token_count,
        truncated=embedded.truncated,
    )


async def abort_with(context: grpc.aio.ServicerContext, error: EmbedError) -> None:
    await context.abort(STATUS_CODES[error.kind], error.message)


async def within_rpc(context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """Run `work` for as long as the RPC lives: when the client cancels or the deadline
    passes, the work is cancelled too, so its queued texts cost no compute."""
    task = asyncio.ensure_future(work)
    context.add_done_callback(lambda _: task.cancel())
    remaining = context.time_remaining()
    try:
        return await asyncio.wait_for(task, remaining) if remaining is not None else await task
    except asyncio.TimeoutError:
        raise DeadlineExceeded("the deadline passed before the texts were embedded") from None


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        service: EmbeddingService,
        backend: str,
        stream_window: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self.service = service
        self.backend = backend
        self.metrics = metrics or service.metrics
        # Items of one stream in flight at once: past it the server stops reading the
        # stream and HTTP/2 flow control pushes back on the client.
        self.stream_window = stream_window

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        try:
            result = await within_rpc(
                context,
                self.service.embed(
                    request.model, list(request.texts), decode_options(request.options)
                ),
            )
        except EmbedError as error:
            await abort_with(context, error)
            raise AssertionError("unreachable") from error
        return pb.EmbedResponse(
            embeddings=[encode_embedding(e) for e in result.embeddings],
            space=encode_space(result.space),
            model=result.model,
            total_tokens=result.total_tokens,
        )

    async def EmbedStream(
        self,
        request_iterator: AsyncIterator[pb.EmbedStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        pending: asyncio.Queue[tuple[str, asyncio.Future[pb.EmbedStreamResponse]] | None]
        pending = asyncio.Queue(maxsize=self.stream_window)
        outstanding: set[asyncio.Future[pb.EmbedStreamResponse]] = set()

        async def read() -> None:
            model = ""
            options: EmbedOptions | InvalidArgument = EmbedOptions()
            try:
                async for request in request_iterator:
                    if request.model:
                        model = request.model
                    if request.HasField("options"):
                        try:
                            options = decode_options(request.options)
                        except InvalidArgument as error:
                            options = error
                    task = asyncio.ensure_future(self._stream_item(model, request.text, options))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                    await pending.put((request.id, task))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())

        def cancel_all(_: object) -> None:
            reader.cancel()
            for task in outstanding:
                task.cancel()

        context.add_done_callback(cancel_all)
        try:
            while (entry := await pending.get()) is not None:
                item_id, task = entry
                response = await task
                response.id = item_id
                yield response
            await reader  # surfaces a broken request stream
        finally:
            cancel_all(None)

    async def _stream_item(
        self, model: str, text: str, options: EmbedOptions | InvalidArgument
    ) -> pb.EmbedStreamResponse:
        try:
            if isinstance(options, InvalidArgument):
                raise options
            embedded, space = await self.service.embed_item(model, text, options)
        except EmbedError as error:
            status = STATUS_CODES[error.kind]
            self.metrics.stream_item(status.name)
            return pb.EmbedStreamResponse(
                error=pb.ItemError(code=status.value[0], message=error.message)
            )
        self.metrics.stream_item(grpc.StatusCode.OK.name)
        return pb.EmbedStreamResponse(
            embedding=encode_embedding(embedded), space=encode_space(space)
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for status in self.service.statuses():
            info = pb.ModelInfo(
                name=status.entry.name,
                source=status.entry.source,
                state=MODEL_STATE[status.state],
                state_reason=status.reason,
                is_default=status.is_default,
            )
            if status.located is not None:
                info.revision = status.located.revision
                info.size_on_disk_bytes = status.located.size_bytes
            engine = status.engine
            if engine is not None:
                profile = engine.profile
                info.dimensions = profile.dimensions
                info.matryoshka_dimensions.extend(profile.matryoshka_dimensions)
                info.max_tokens = profile.max_tokens
                info.pooling = POOLING[profile.pooling]
                info.prompts.update(profile.prompts)
                info.dtype = profile.dtype
                info.memory_bytes = engine.memory_bytes
                info.architecture = profile.architecture
            models.append(info)
        return pb.ListModelsResponse(models=models)

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        models = []
        all_serving = self.service.accepting
        for status in self.service.statuses():
            if status.state is ModelState.LOADED:
                serving = pb.SERVING_STATUS_SERVING
            else:
                serving = pb.SERVING_STATUS_NOT_SERVING
            if status.state in (ModelState.LOADED, ModelState.LOADING, ModelState.FAILED):
                models.append(
                    pb.ModelHealth(name=status.entry.name, status=serving, reason=status.reason)
                )
        serving_now = all_serving and self.service.ready
        return pb.HealthResponse(
            status=pb.SERVING_STATUS_SERVING if serving_now else pb.SERVING_STATUS_NOT_SERVING,
            version=self.service.version,
            uptime_seconds=self.service.uptime_seconds,
            models=models,
            backend=self.backend,
        )
