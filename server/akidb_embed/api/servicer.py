"""The gRPC layer: decode the request, call the domain service, encode the response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
import numpy as np

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from ..errors import DeadlineExceeded, EmbedError, ErrorKind, InvalidArgument
from ..modeling.chunking import Chunks
from ..modeling.encodings import Encoding, Ranges
from ..modeling.engine import EmbeddingEngine, EmbeddingSpace, EmbedOptions, PromptKind
from ..modeling.models.base import Pooling
from ..modeling.tokenization import Truncation
from ..observability.metrics import Metrics
from ..service.service import EmbeddingService, GroupResult, ModelState
from ..service.streams import StreamGroups

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
    pb.TRUNCATION_POLICY_CHUNK: Truncation.CHUNK,
}
_ENCODING = {
    pb.ENCODING_UNSPECIFIED: Encoding.FLOAT32,
    pb.ENCODING_FLOAT32: Encoding.FLOAT32,
    pb.ENCODING_FLOAT16: Encoding.FLOAT16,
    pb.ENCODING_INT8: Encoding.INT8,
    pb.ENCODING_UINT8: Encoding.UINT8,
    pb.ENCODING_BINARY: Encoding.BINARY,
    pb.ENCODING_UBINARY: Encoding.UBINARY,
}
ENCODING_PB = {encoding: number for number, encoding in _ENCODING.items() if number}
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
            f"truncation={options.truncation} is not a TruncationPolicy; "
            "use ERROR, END, START or CHUNK"
        )
    encoding = _ENCODING.get(options.encoding)
    if encoding is None:
        raise InvalidArgument(
            f"encoding={options.encoding} is not an Encoding; use FLOAT32, FLOAT16, INT8, "
            "UINT8, BINARY or UBINARY"
        )
    if truncation is not Truncation.CHUNK and (
        options.chunk_tokens or options.chunk_overlap_tokens
    ):
        raise InvalidArgument(
            "chunk_tokens and chunk_overlap_tokens apply only with truncation CHUNK; "
            "set truncation to TRUNCATION_POLICY_CHUNK or leave them 0"
        )
    which = options.WhichOneof("prompt_choice")
    return EmbedOptions(
        normalize=options.normalize if options.HasField("normalize") else True,
        dimensions=options.dimensions,
        truncation=truncation,
        prompt_kind=_PROMPT_KIND[which] if which else PromptKind.NONE,
        prompt_value=getattr(options, which) if which else "",
        encoding=encoding,
        chunk_tokens=options.chunk_tokens,
        chunk_overlap=options.chunk_overlap_tokens,
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
        encoding=ENCODING_PB[space.encoding],
        ranges_id=space.ranges_id,
    )


def encode_batch(
    vectors: np.ndarray,
    token_counts: list[int],
    truncated: list[bool],
    space: EmbeddingSpace | None = None,
    chunks: Chunks | None = None,
) -> pb.EmbeddingBatch:
    """Every row in one buffer, already in its encoding: one copy, whatever the number of
    texts. `dimensions` is the space's (a binary row holds dimensions / 8 bytes)."""
    width = vectors.shape[1] if vectors.ndim == 2 else 0
    encoding = Encoding.FLOAT32 if space is None else space.encoding
    batch = pb.EmbeddingBatch(
        vectors=vectors.tobytes(),
        dimensions=space.dimensions if space is not None and width else width,
        token_counts=token_counts,
        truncated=truncated,
        encoding=ENCODING_PB[encoding],
    )
    if chunks is not None:
        batch.chunk_counts.extend(chunks.counts.tolist())
        batch.chunk_index.extend(chunks.index.tolist())
        batch.char_start.extend(chunks.char_start.tolist())
        batch.char_end.extend(chunks.char_end.tolist())
        batch.byte_start.extend(chunks.byte_start.tolist())
        batch.byte_end.extend(chunks.byte_end.tolist())
    return batch


def encode_ranges(ranges: Ranges) -> pb.QuantizationRanges:
    return pb.QuantizationRanges(
        dimensions=ranges.dimensions,
        normalized=ranges.normalized,
        min=ranges.minimum.tolist(),
        max=ranges.maximum.tolist(),
        id=ranges.id,
        calibration_texts=ranges.calibration_texts,
    )


def model_ranges(engine: EmbeddingEngine) -> list[pb.QuantizationRanges]:
    """The native size and each advertised Matryoshka size, normalised."""
    if engine.calibration is None:
        return []
    sizes = [engine.profile.dimensions, *engine.profile.matryoshka_dimensions]
    return [encode_ranges(engine.ranges(size, True)) for size in sizes]


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


class _StreamWindow:
    """Items of one stream in flight: past the window the reader stops reading, so HTTP/2
    flow control pushes back on the client. A message larger than the window takes it all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._room = asyncio.Condition()

    async def acquire(self, items: int) -> int:
        items = min(items, self.size)
        async with self._room:
            await self._room.wait_for(lambda: self.used + items <= self.size)
            self.used += items
        return items

    async def release(self, items: int) -> None:
        async with self._room:
            self.used -= items
            self._room.notify_all()


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        service: EmbeddingService,
        backend: str,
        stream_window: int = 4096,
        metrics: Metrics | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.service = service
        self.backend = backend
        self.metrics = metrics or service.metrics
        # Items of one stream in flight at once: past it the server stops reading the
        # stream and HTTP/2 flow control pushes back on the client.
        self.stream_window = stream_window
        self.max_message_bytes = max_message_bytes

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
            embeddings=encode_batch(
                result.vectors, result.token_counts, result.truncated, result.space, result.chunks
            ),
            space=encode_space(result.space),
            model=result.model,
            total_tokens=result.total_tokens,
        )

    async def EmbedStream(
        self,
        request_iterator: AsyncIterator[pb.EmbedStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        window = _StreamWindow(self.stream_window)
        groups = StreamGroups(self.service)
        # One entry per request message, in order: its ids, its result, its window share.
        pending: asyncio.Queue[tuple[list[str], asyncio.Future[GroupResult], int] | None]
        pending = asyncio.Queue()
        broken: list[EmbedError] = []

        async def read() -> None:
            model = ""
            options: EmbedOptions | EmbedError = EmbedOptions()
            try:
                async for request in request_iterator:
                    if request.model:
                        model = request.model
                    if request.HasField("options"):
                        try:
                            options = decode_options(request.options)
                        except InvalidArgument as error:
                            options = error
                    ids, texts = list(request.ids), list(request.texts)
                    if len(ids) != len(texts):
                        broken.append(
                            InvalidArgument(
                                f"a stream message has {len(ids)} ids and {len(texts)} texts: "
                                "give every text exactly one id"
                            )
                        )
                        return
                    # Every message gets one response, an empty one too.
                    share = await window.acquire(len(ids)) if ids else 0
                    await pending.put((ids, groups.add(model, texts, options), share))
            finally:
                groups.flush()
                await pending.put(None)

        reader = asyncio.create_task(read())

        def cancel_all(_: object) -> None:
            reader.cancel()
            groups.cancel()

        context.add_done_callback(cancel_all)
        last_space = ""
        try:
            while (entry := await pending.get()) is not None:
                ids, result_of, share = entry
                result = await result_of
                if share:
                    await window.release(share)
                response = self._encode_group(ids, result, last_space)
                if result.space is not None and len(result.vectors):
                    last_space = result.space.fingerprint
                yield response
            await reader  # surfaces a broken request stream
            if broken:
                await abort_with(context, broken[0])
        finally:
            cancel_all(None)

    def _encode_group(
        self, ids: list[str], result: GroupResult, last_space: str
    ) -> pb.EmbedStreamResponse:
        response = pb.EmbedStreamResponse(
            ids=ids,
            embeddings=encode_batch(
                result.vectors, result.token_counts, result.truncated, result.space, result.chunks
            ),
        )
        space = result.space
        if space is not None and len(result.vectors) and space.fingerprint != last_space:
            response.space.CopyFrom(encode_space(space))
        ok = result.size - len(result.errors)
        if ok:
            self.metrics.stream_items_answered(grpc.StatusCode.OK.name, ok)
        for index, error in result.errors:
            status = STATUS_CODES[error.kind]
            self.metrics.stream_items_answered(status.name, 1)
            response.errors.add(index=index, code=status.value[0], message=error.message)
        return response

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
                info.quantization_ranges.extend(model_ranges(engine))
                info.self_check = engine.self_check
            models.append(info)
        return pb.ListModelsResponse(models=models)

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        models = []
        all_serving = self.service.accepting
        for name, state, reason in self.service.model_health():
            if state is ModelState.LOADED:
                serving = pb.SERVING_STATUS_SERVING
            else:
                serving = pb.SERVING_STATUS_NOT_SERVING
            models.append(pb.ModelHealth(name=name, status=serving, reason=reason))
        pool = self.service.scheduler.pool
        ready_workers = pool.ready_count if pool is not None else 0
        if pool is not None and ready_workers == 0:
            models.append(
                pb.ModelHealth(
                    name="engine-workers",
                    status=pb.SERVING_STATUS_NOT_SERVING,
                    reason=self.service.capacity_reason(),
                )
            )
        serving_now = all_serving and self.service.can_serve()
        limits = self.service.limits
        return pb.HealthResponse(
            status=pb.SERVING_STATUS_SERVING if serving_now else pb.SERVING_STATUS_NOT_SERVING,
            version=self.service.version,
            uptime_seconds=self.service.uptime_seconds,
            models=models,
            backend=self.backend,
            limits=pb.ServerLimits(
                max_texts_per_request=limits.max_texts_per_request,
                max_chars_per_text=limits.max_chars_per_text,
                max_chars_per_request=limits.max_chars_per_request,
                max_queued_tokens=limits.max_queued_tokens,
                stream_window=self.stream_window,
                max_message_bytes=self.max_message_bytes,
            ),
            workers_ready=ready_workers,
            workers_configured=pool.processes if pool is not None else 0,
        )
