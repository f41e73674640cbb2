"""The domain facade the gRPC servicer calls: models by name, embedding, status.

No gRPC here. All MLX work goes through the Scheduler (runtime/batching.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx
import numpy as np

from .. import __version__
from ..errors import (
    EmbedError,
    InvalidArgument,
    ModelLoadError,
    ModelNotAvailable,
    Overloaded,
    Unavailable,
)
from ..modeling.chunking import Chunks
from ..modeling.encodings import encode
from ..modeling.engine import (
    EmbeddingEngine,
    EmbeddingSpace,
    EmbedOptions,
    PromptKind,
    finish_batch,
)
from ..modeling.loader import load_engine, load_front
from ..modeling.precision import ModelPrecision
from ..modeling.tokenization import TokenBatch, Truncation, pack
from ..observability.metrics import Metrics
from ..runtime.batching import GroupOutput, Scheduler
from ..runtime.workers import ModelSpec
from ..store.registry import LocatedModel, ModelEntry, Registry
from . import model_records
from .pulls import ModelFetcher, PullLimits
from .residency import ModelBudget, ResidentModels

log = logging.getLogger(__name__)


class ModelState(Enum):
    LOADED = "loaded"
    ON_DISK = "on_disk"
    NOT_DOWNLOADED = "not_downloaded"
    LOADING = "loading"
    FAILED = "failed"


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int = 1024
    max_chars_per_text: int = 200_000
    # Characters of one Embed request, all texts together.
    max_chars_per_request: int = 16_000_000
    # Characters of every request and stream message being worked on at once; past it
    # Embed gets RESOURCE_EXHAUSTED and streams wait. Bounds the text the server holds.
    max_chars_in_flight: int = 64_000_000
    # Past this many queued tokens, unary calls get RESOURCE_EXHAUSTED.
    max_queued_tokens: int = 2_000_000
    # Embed calls with at most this many texts are queries: they skip the bulk queue.
    interactive_max_texts: int = 8


@dataclass(frozen=True)
class EmbedResult:
    """An Embed call's vectors: row i of `vectors` is text i's, in input order."""

    model: str
    space: EmbeddingSpace
    # (N, dimensions) float32 by default; rows in `space.encoding` (e.g. int8, or packed
    # bits for binary: N x ceil(dimensions / 8)), C-contiguous: sent as one buffer.
    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[bool]
    # Truncation.CHUNK: which rows are whose, and each row's window (else None).
    chunks: Chunks | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class GroupResult:
    """A stream message's results: `vectors` has one row per text without an error, in
    order; `errors` names the others by their index in the group."""

    size: int
    space: EmbeddingSpace | None
    vectors: np.ndarray  # rows in space.encoding, as EmbedResult.vectors
    token_counts: list[int]
    truncated: list[bool]
    errors: list[tuple[int, EmbedError]]
    # Truncation.CHUNK: `chunks.counts` has one entry per text without an error.
    chunks: Chunks | None = None

    @staticmethod
    def empty() -> GroupResult:
        return GroupResult(0, None, _EMPTY, [], [], [])

    def split(self, sizes: Sequence[int]) -> list[GroupResult]:
        """The results of consecutive parts of this group, `sizes` texts each (they sum to
        `size`): views of the same buffers, errors indexed within their part."""
        if len(sizes) == 1:
            return [self]
        parts: list[GroupResult] = []
        start = texts_done = rows_done = next_error = 0
        for size in sizes:
            stop = start + size
            errors = []
            while next_error < len(self.errors) and self.errors[next_error][0] < stop:
                index, error = self.errors[next_error]
                errors.append((index - start, error))
                next_error += 1
            ok = size - len(errors)
            chunks = None
            if self.chunks is not None:
                counts = self.chunks.counts[texts_done : texts_done + ok]
                rows = slice(rows_done, rows_done + int(counts.sum()))
                chunks = self.chunks.select_rows(np.arange(len(self.chunks))[rows], counts)
            else:
                rows = slice(rows_done, rows_done + ok)
            parts.append(
                GroupResult(
                    size=size,
                    space=self.space,
                    vectors=self.vectors[rows],
                    token_counts=self.token_counts[rows],
                    truncated=self.truncated[rows],
                    errors=errors,
                    chunks=chunks,
                )
            )
            texts_done += ok
            rows_done = rows.stop
            start = stop
        if start != self.size:
            raise ValueError(f"parts of {start} texts for a group of {self.size}")
        return parts


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    state: ModelState
    reason: str
    engine: EmbeddingEngine | None
    located: LocatedModel | None
    is_default: bool


class EmbeddingService:
    def __init__(
        self,
        registry: Registry,
        scheduler: Scheduler,
        limits: Limits | None = None,
        budget: ModelBudget | None = None,
        allow_downloads: bool = False,
        metrics: Metrics | None = None,
        pulls: PullLimits | None = None,
        precision: ModelPrecision | None = None,
    ) -> None:
        self.registry = registry
        # What every load computes in, in this process and in the engine workers.
        self.precision = precision or ModelPrecision.from_env()
        self.scheduler = scheduler
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.residents = ResidentModels(budget or ModelBudget())
        # Pull a known model that is not cached on first request, instead of
        # FAILED_PRECONDITION with the pull command.
        self.allow_downloads = allow_downloads
        # Content checks and pulls, on threads of their own and bounded (pulls.py).
        self.fetcher = ModelFetcher(registry, pulls, allow_downloads)
        # Told when a model starts (True) or stops (False) serving: the server's health.
        self.on_model_change: Callable[[str, bool], Awaitable[None]] | None = None
        self.started_at = time.monotonic()
        self.accepting = True
        # True once the preloaded models are warm (the server flips it).
        self.ready = False
        self._loading: dict[str, asyncio.Future[EmbeddingEngine]] = {}
        self._calibrating: dict[str, asyncio.Future[None]] = {}
        self._failed: dict[str, str] = {}
        # Models that produced non-finite vectors: refused until restart, with the reason.
        self._refused: dict[str, str] = {}
        # Tokenising bulk groups, off the event loop (tokenizers releases the GIL).
        self._tokenizers = concurrent.futures.ThreadPoolExecutor(2, "tokenize")
        self._chars_in_flight = 0
        self._text_room = asyncio.Condition()

    @property
    def version(self) -> str:
        return __version__

    @property
    def busy(self) -> bool:
        """Whether accepted work is still in progress (text being embedded or queued)."""
        return self._chars_in_flight > 0 or self.scheduler.queued_items > 0

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_at

    def loaded(self) -> list[EmbeddingEngine]:
        return self.residents.engines()

    async def _notify(self, name: str, serving: bool) -> None:
        if self.on_model_change is not None:
            await self.on_model_change(name, serving)

    async def engine(self, name: str, pin: bool = False) -> EmbeddingEngine:
        """The warm engine for `name`, loading it first if it is on disk. A pinned model
        (preloaded) is never unloaded for the budget or the keep-alive."""
        entry = self.registry.resolve(name)
        if entry.name in self._refused:
            raise ModelNotAvailable(self._refused[entry.name])
        engine = self.residents.get(entry.name)
        if engine is None:
            pending = self._loading.get(entry.name)
            if pending is None:
                pending = asyncio.ensure_future(self._load(entry))
                self._loading[entry.name] = pending
                pending.add_done_callback(lambda _: self._loading.pop(entry.name, None))
            engine = await asyncio.shield(pending)
        if pin:
            self.residents.pin(entry.name)
        return engine

    async def unload(self, name: str) -> None:
        self.residents.remove(name)
        await asyncio.to_thread(self.scheduler.unload_everywhere, name)
        # Give the freed buffers back; MLX keeps a cache otherwise.
        await asyncio.wrap_future(self.scheduler.call(mx.clear_cache))
        log.info("unloaded model %s", name)
        await self._notify(name, False)

    async def unload_expired(self) -> None:
        """Unload idle on-demand models past the keep-alive (the server calls this)."""
        for name in self.residents.expired():
            await self.unload(name)

    async def _make_room(self, entry: ModelEntry, size_bytes: int) -> None:
        """Unload what must go for `entry` to fit, and hold its place in the budget (released
        by `_load` when it fails; taken over by the model once loaded)."""
        victims = self.residents.evictions_for(size_bytes)
        if victims is None:
            budget = self.residents.budget
            raise Overloaded(
                f"loading {entry.name!r} would exceed the model budget "
                f"(max {budget.max_models or 'any'} models, "
                f"{budget.max_bytes or 'any'} bytes) and every model in it is busy, "
                "preloaded or still loading; retry later, or raise --max-loaded-models / "
                "--max-loaded-mb"
            )
        self.residents.reserve(entry.name, size_bytes)  # before any await: no other load fits
        for name in victims:
            await self.unload(name)

    async def _failed_to_load(self, entry: ModelEntry, error: EmbedError) -> None:
        self._failed[entry.name] = error.message
        log.error("model %s failed to load: %s", entry.name, error.message)
        await self._notify(entry.name, False)

    async def _load(self, entry: ModelEntry) -> EmbeddingEngine:
        # sha256 check, or a pull (minutes): threads of their own, never the compute thread.
        try:
            located = await self.fetcher.locate(
                entry, lambda message: log.info("%s: %s", entry.name, message)
            )
        except ModelLoadError as failure:  # damaged files, or a model that cannot be served
            await self._failed_to_load(entry, failure)
            raise
        # Every process that computes holds its own copy of the weights.
        await self._make_room(entry, located.size_bytes * self.scheduler.copies)
        try:
            return await self._load_located(entry, located)
        finally:
            self.residents.release(entry.name)  # a no-op once the model is resident

    async def _load_located(self, entry: ModelEntry, located: LocatedModel) -> EmbeddingEngine:
        started = time.monotonic()
        log.info("loading model %s from %s", entry.name, located.directory)

        def load_and_warm() -> EmbeddingEngine:
            engine = load_engine(
                located.directory,
                name=entry.name,
                source=entry.source,
                revision=located.revision,
                precision=self.precision.policy,
                cpu_precision=self.precision.cpu,
            )
            engine.warm_up()  # compiles kernels; refuses weights that give NaN/inf
            # Compares the probe vectors with the record (refusing a drift), calibrates.
            engine.records_folder = model_records.prepare(engine, located.directory)
            return engine

        try:
            with self.metrics.time_model_load(entry.name):
                if self.scheduler.pool is None:
                    engine = await asyncio.wrap_future(self.scheduler.call(load_and_warm))
                else:  # off the scheduler thread: it keeps serving the other models
                    engine = await asyncio.to_thread(self._load_in_workers, entry, located)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ModelLoadError)
                else ModelLoadError(f"model {entry.name!r} failed to load: {exc}")
            )
            await self._failed_to_load(entry, error)
            raise error from exc
        self._failed.pop(entry.name, None)
        self.residents.add(engine, pinned=False)
        log.info("model %s ready in %.2fs", entry.name, time.monotonic() - started)
        await self._notify(entry.name, True)
        return engine

    def _load_in_workers(self, entry: ModelEntry, located: LocatedModel) -> EmbeddingEngine:
        """Engine workers load (and warm up) the network; this process keeps only the front
        half, whose forwards (self-check, calibration) run in the workers too."""
        spec = ModelSpec(
            entry.name, located.directory, entry.source, located.revision, self.precision
        )
        facts = self.scheduler.load_everywhere(spec)
        try:
            engine = load_front(
                located.directory,
                name=entry.name,
                source=entry.source,
                revision=located.revision,
                facts=facts,
                compute=self.scheduler.remote_compute(entry.name),
            )
            engine.memory_bytes = facts.memory_bytes * self.scheduler.copies
            engine.records_folder = model_records.prepare(engine, located.directory)
        except BaseException:
            self.scheduler.unload_everywhere(entry.name)
            raise
        return engine

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another instance")

    def _check_texts(self, texts: Sequence[str]) -> None:
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text")
        if len(texts) > self.limits.max_texts_per_request:
            raise InvalidArgument(
                f"{len(texts)} texts in one request; the limit is "
                f"{self.limits.max_texts_per_request}: split the batch or use EmbedStream"
            )
        for index, text in enumerate(texts):
            check_text(text, index, self.limits.max_chars_per_text)

    @contextlib.asynccontextmanager
    async def _holding_text(self, chars: int, wait: bool) -> AsyncIterator[None]:
        """Count `chars` against the in-flight text budget while the work runs. A request
        that does not fit is refused (`wait=False`) or waits for room (streams)."""
        budget = self.limits.max_chars_in_flight
        chars = min(chars, budget)  # a group larger than the budget runs alone
        async with self._text_room:
            if self._chars_in_flight + chars > budget:
                if not wait:
                    raise Overloaded(
                        f"the server is working on {self._chars_in_flight} characters of text "
                        f"(limit {budget}); retry with backoff, send smaller requests, or "
                        "use EmbedStream"
                    )
                await self._text_room.wait_for(lambda: self._chars_in_flight + chars <= budget)
            self._chars_in_flight += chars
        try:
            yield
        finally:
            async with self._text_room:
                self._chars_in_flight -= chars
                self._text_room.notify_all()

    async def _tokenize(
        self, engine: EmbeddingEngine, texts: Sequence[str], options: EmbedOptions
    ) -> TokenBatch:
        """One batch call; off the event loop unless the group is a query's few texts (a
        long text is only tokenised as far as the model's window, so those stay cheap)."""
        with self.metrics.time_tokenize(engine.name):
            if len(texts) <= self.limits.interactive_max_texts:
                return engine.tokenize_batch(texts, options)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._tokenizers, engine.tokenize_batch, texts, options
            )

    async def _tokenize_chunks(
        self, engine: EmbeddingEngine, texts: Sequence[str], options: EmbedOptions
    ) -> tuple[TokenBatch, Chunks]:
        """Truncation.CHUNK: whole texts are tokenised, so off the loop unless small."""
        with self.metrics.time_tokenize(engine.name):
            if len(texts) <= self.limits.interactive_max_texts and sum(map(len, texts)) < 8192:
                return engine.tokenize_chunks(texts, options)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._tokenizers, engine.tokenize_chunks, texts, options
            )

    def _check_windows(self, windows: int, where: str) -> None:
        limit = self.limits.max_texts_per_request
        if windows > limit:
            raise InvalidArgument(
                f"{where} gives {windows} chunk windows; the limit is {limit} windows: "
                "split it, or use a larger chunk_tokens"
            )

    async def _compute(
        self, engine: EmbeddingEngine, tokens: TokenBatch, interactive: bool
    ) -> GroupOutput:
        future = self.scheduler.submit_group(engine, tokens.ids, tokens.offsets, interactive)
        return await asyncio.wrap_future(future)  # cancelling the caller dequeues the group

    def _check_finite(self, engine: EmbeddingEngine, vectors: np.ndarray) -> np.ndarray:
        """Rows that hold NaN or inf never leave the server: the mask of the good ones. A
        model that produced one is refused from now on, with the reason in its health."""
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            reason = (
                f"model {engine.name!r} produced non-finite values (NaN or inf) for "
                f"{int((~finite).sum())} texts: its weights are damaged, so it is refused "
                f"until the server restarts; run `akidb-embed pull {engine.name} --force` "
                "(or restore its files) and restart"
            )
            if engine.name not in self._refused:
                log.error("%s", reason)
                self._refused[engine.name] = reason
                asyncio.get_running_loop().create_task(self.unload(engine.name))
        return finite

    async def _calibrated(self, engine: EmbeddingEngine, options: EmbedOptions) -> None:
        """int8/uint8 need the model's calibration: computed once, on the compute thread,
        on the first request that asks (later loads read it from the records folder)."""
        folder = engine.records_folder
        if not options.encoding.needs_ranges or engine.calibration is not None or folder is None:
            return
        pending = self._calibrating.get(engine.name)
        if pending is None:

            def calibrate() -> None:
                if engine.calibration is None:
                    engine.calibration = model_records.load_calibration(engine, folder)

            log.info("calibrating model %s for int8/uint8", engine.name)
            pending = (
                asyncio.wrap_future(self.scheduler.call(calibrate))
                if engine.network is not None
                else asyncio.ensure_future(asyncio.to_thread(calibrate))  # engine workers
            )
            self._calibrating[engine.name] = pending
            pending.add_done_callback(lambda _: self._calibrating.pop(engine.name, None))
        try:
            await asyncio.shield(pending)
        except EmbedError:
            raise
        except Exception as exc:
            raise as_embed_error(exc) from exc

    def _encode(
        self, engine: EmbeddingEngine, vectors: np.ndarray, options: EmbedOptions
    ) -> np.ndarray:
        """The finished rows in the requested encoding, all at once."""
        encoding = options.encoding
        if not encoding.needs_ranges:
            return encode(vectors, encoding)
        return encode(vectors, encoding, engine.ranges(vectors.shape[1], options.normalize))

    async def embed(self, model: str, texts: Sequence[str], options: EmbedOptions) -> EmbedResult:
        """Embed a batch; any bad text fails the whole call with an error naming it."""
        self._check_accepting()
        self._check_texts(texts)
        chars = sum(map(len, texts))
        if chars > self.limits.max_chars_per_request:
            raise Overloaded(
                f"the request holds {chars} characters; the limit is "
                f"{self.limits.max_chars_per_request}: split it or use EmbedStream"
            )
        engine = await self.engine(model)
        async with self._holding_text(chars, wait=False):
            with self.residents.use(engine.name):
                return await self._embed(engine, texts, options)

    async def _embed(
        self, engine: EmbeddingEngine, texts: Sequence[str], options: EmbedOptions
    ) -> EmbedResult:
        await self._calibrated(engine, options)
        space = engine.space(options)
        chunks = None
        if options.truncation is Truncation.CHUNK:
            tokens, chunks = await self._tokenize_chunks(engine, texts, options)
            self._check_windows(len(tokens), f"the request's {len(texts)} texts")
        else:
            tokens = await self._tokenize(engine, texts, options)
        if tokens.too_long:
            index = min(tokens.too_long)
            raise InvalidArgument(f"texts[{index}] {tokens.too_long[index]}")
        return await self._compute_all(engine, space, tokens, options, chunks)

    async def _compute_all(
        self,
        engine: EmbeddingEngine,
        space: EmbeddingSpace,
        tokens: TokenBatch,
        options: EmbedOptions,
        chunks: Chunks | None = None,
    ) -> EmbedResult:
        """A unary call's compute, all or nothing: any row's failure fails the call."""
        if self.scheduler.queued_tokens > self.limits.max_queued_tokens:
            raise Overloaded(
                f"the server has {self.scheduler.queued_tokens} tokens queued (limit "
                f"{self.limits.max_queued_tokens}); retry with backoff or use EmbedStream"
            )
        # Rows count (chunk windows included): one long document is bulk work, not a query.
        interactive = len(tokens) <= self.limits.interactive_max_texts
        output = await self._compute(engine, tokens, interactive)
        if output.errors:
            raise as_embed_error(output.errors[min(output.errors)])
        vectors = finish_batch(output.vectors, space.dimensions, options.normalize)
        if not self._check_finite(engine, vectors).all():
            raise ModelNotAvailable(self._refused[engine.name])
        return EmbedResult(
            model=engine.name,
            space=space,
            vectors=self._encode(engine, vectors, options),
            token_counts=tokens.lengths.tolist(),
            truncated=tokens.truncated.tolist(),
            chunks=chunks,
        )

    async def embed_token_ids(
        self, model: str, ids: Sequence[Sequence[int]], options: EmbedOptions
    ) -> EmbedResult:
        """Embed inputs already tokenised with the model's own tokenizer (special tokens
        included), as they are: no prompt is added. Lists longer than the model's limit are
        cut by `options.truncation` like texts are."""
        self._check_accepting()
        if not ids:
            raise InvalidArgument("the token id lists are empty: send at least one list")
        if len(ids) > self.limits.max_texts_per_request:
            raise InvalidArgument(
                f"{len(ids)} token id lists in one request; the limit is "
                f"{self.limits.max_texts_per_request}: split the batch"
            )
        if options.prompt_kind is not PromptKind.NONE:
            raise InvalidArgument(
                "prompts apply to texts; token ids are embedded as they are: "
                "put the prompt's tokens in the ids, or send text"
            )
        engine = await self.engine(model)
        # Each id stands for at least one character: the text budget bounds id input too.
        async with self._holding_text(sum(map(len, ids)), wait=False):
            with self.residents.use(engine.name):
                tokens = check_token_ids(
                    ids,
                    engine.name,
                    engine.tokenizer.vocab_size,
                    engine.tokenizer.max_tokens,
                    options.truncation,
                )
                return await self._compute_all(engine, engine.space(options), tokens, options)

    async def embed_group(
        self, model: str, texts: Sequence[str], options: EmbedOptions | EmbedError
    ) -> GroupResult:
        """One stream message: every text gets its vector or its own error (a bad text, or
        what stops the whole group: unknown model, bad options, shutting down). No queue
        limit here: the stream's window bounds it."""
        size = len(texts)
        if not size:
            return GroupResult.empty()
        try:
            self._check_accepting()
            if isinstance(options, EmbedError):
                raise options
            engine = await self.engine(model)
            await self._calibrated(engine, options)
            space = engine.space(options)
            engine.prefix(options)  # an unknown prompt name fails the group here
        except EmbedError as error:
            return GroupResult(size, None, _EMPTY, [], [], [(i, error) for i in range(size)])
        errors: list[tuple[int, EmbedError]] = []
        limit = self.limits.max_chars_per_text
        for index, text in enumerate(texts):
            if not text or len(text) > limit:
                try:
                    check_text(text, None, limit)
                except InvalidArgument as error:
                    errors.append((index, error))
        bad = {i for i, _ in errors}
        keep = [i for i in range(size) if i not in bad] if bad else list(range(size))
        wanted = texts if len(keep) == size else [texts[i] for i in keep]
        if not wanted:
            return GroupResult(size, space, _EMPTY, [], [], errors)
        chunks: Chunks | None = None
        async with self._holding_text(sum(map(len, wanted)), wait=True):
            with self.residents.use(engine.name):
                positions = np.asarray(keep, dtype=np.int64)  # group index of each row
                if options.truncation is Truncation.CHUNK:
                    try:
                        tokens, chunks = await self._tokenize_chunks(engine, wanted, options)
                    except InvalidArgument as error:
                        errors += [(i, error) for i in keep]
                        errors.sort(key=lambda pair: pair[0])
                        return GroupResult(size, space, _EMPTY, [], [], errors)
                    positions = positions[chunks.text_of_row]
                    limit = self.limits.max_texts_per_request
                    over = np.flatnonzero(chunks.counts > limit)
                    for i in over.tolist():
                        message = (
                            f"text gives {int(chunks.counts[i])} chunk windows; the limit is "
                            f"{limit} windows a text: split it, or use a larger chunk_tokens"
                        )
                        errors.append((keep[i], InvalidArgument(message)))
                    if len(over):
                        run = np.flatnonzero(~np.isin(positions, [keep[i] for i in over]))
                        tokens, positions = tokens.select(run), positions[run]
                        chunks = chunks.select_rows(run, chunks.counts[chunks.counts <= limit])
                    if not len(tokens):
                        errors.sort(key=lambda pair: pair[0])
                        return GroupResult(size, space, _EMPTY, [], [], errors)
                else:
                    tokens = await self._tokenize(engine, wanted, options)
                if tokens.too_long:
                    for i, message in tokens.too_long.items():
                        errors.append((keep[i], InvalidArgument(f"text {message}")))
                    run = np.setdiff1d(np.arange(len(tokens)), list(tokens.too_long))
                    tokens, positions = tokens.select(run), positions[run]
                output = await self._compute(engine, tokens, interactive=False)
        vectors = finish_batch(output.vectors, space.dimensions, options.normalize)
        finite = self._check_finite(engine, vectors)
        good = finite.copy()
        failed: dict[int, EmbedError] = {}  # group index -> its first error
        for row, failure in sorted(output.errors.items()):
            good[row] = False
            failed.setdefault(int(positions[row]), as_embed_error(failure))
        for row in np.flatnonzero(~finite).tolist():
            if row not in output.errors and int(positions[row]) not in failed:
                failed[int(positions[row])] = ModelNotAvailable(self._refused[engine.name])
        if not good.all():
            # An item whose window failed fails whole: none of its rows are sent.
            good &= ~np.isin(positions, list(failed))
            vectors = vectors[good]
        errors += failed.items()
        errors.sort(key=lambda pair: pair[0])
        if chunks is not None:
            kept = np.flatnonzero(good)
            _, counts = np.unique(positions[kept], return_counts=True)
            chunks = chunks.select_rows(kept, counts.astype(np.int64))
        return GroupResult(
            size=size,
            space=space,
            vectors=self._encode(engine, vectors, options),
            token_counts=tokens.lengths[good].tolist(),
            truncated=tokens.truncated[good].tolist(),
            errors=errors,
            chunks=chunks,
        )

    def can_serve(self) -> bool:
        """Ready, the default model not refused, and (with engine workers) at least one
        worker process able to compute."""
        if not self.ready or self.registry.default_model in self._refused:
            return False
        pool = self.scheduler.pool
        return pool is None or pool.ready_count > 0

    def capacity_reason(self) -> str:
        pool = self.scheduler.pool
        if pool is None or pool.ready_count:
            return ""
        why = f" (last: {pool.last_failure})" if pool.last_failure else ""
        return (
            f"no engine worker can compute: 0 of {pool.processes} ready, restarting{why}; "
            "work waits in the queue"
        )

    def model_health(self) -> list[tuple[str, ModelState, str]]:
        """(name, state, reason) of each model loaded, loading or failed, in that order of
        precedence: what health reports. From memory only: a probe must not walk the model
        cache on the event loop (statuses() does, for ListModels)."""
        out: list[tuple[str, ModelState, str]] = []
        seen: set[str] = set()
        loaded = [(e.name, ModelState.LOADED, "") for e in self.residents.engines()]
        loading = [(name, ModelState.LOADING, "") for name in self._loading]
        refused = [(n, ModelState.FAILED, r) for n, r in self._refused.items()]
        failed = [(n, ModelState.FAILED, r) for n, r in self._failed.items()]
        for name, state, reason in loaded + loading + refused + failed:
            if name not in seen:
                seen.add(name)
                out.append((name, state, reason))
        return out

    def statuses(self) -> list[ModelStatus]:
        """Every model the server knows: the registry's, the cache's, and any loaded or
        loading by another spelling (e.g. `name@revision`)."""
        out = []
        entries = self.registry.entries()
        listed = {entry.name for entry in entries}
        for name in [e.name for e in self.residents.engines()] + list(self._loading):
            if name not in listed:
                with contextlib.suppress(EmbedError):
                    entries.append(self.registry.resolve(name))
                    listed.add(name)
        for entry in entries:
            engine = self.residents.get(entry.name)
            located = self.registry.locate(entry)
            reason = ""
            if engine is not None:
                state = ModelState.LOADED
            elif entry.name in self._loading:
                state = ModelState.LOADING
            elif entry.name in self._refused:
                state, reason = ModelState.FAILED, self._refused[entry.name]
            elif entry.name in self._failed:
                state, reason = ModelState.FAILED, self._failed[entry.name]
            elif located is not None:
                state = ModelState.ON_DISK
            else:
                state = ModelState.NOT_DOWNLOADED
                reason = f"run `akidb-embed pull {entry.name}`"
            is_default = entry.name == self.registry.default_model
            out.append(ModelStatus(entry, state, reason, engine, located, is_default))
        return out


def check_text(text: str, index: int | None, max_chars: int) -> None:
    where = "text" if index is None else f"texts[{index}]"
    if not text:
        raise InvalidArgument(f"{where} is empty: send at least one character")
    if len(text) > max_chars:
        raise InvalidArgument(
            f"{where} has {len(text)} characters; the limit is {max_chars}: split it"
        )


def check_token_ids(
    ids: Sequence[Sequence[int]],
    model: str,
    vocab_size: int,
    max_tokens: int,
    truncation: Truncation,
) -> TokenBatch:
    """Validate token id lists for `model` and cut the long ones by `truncation`."""
    rows: list[Sequence[int]] = []
    truncated: list[bool] = []
    for index, row in enumerate(ids):
        if not row:
            raise InvalidArgument(f"token id list {index} is empty: send at least one token id")
        for position, token in enumerate(row):
            if not 0 <= token < vocab_size:
                raise InvalidArgument(
                    f"token id list {index} has {token} at position {position}, which is not "
                    f"a token of model {model!r} (ids run from 0 to {vocab_size - 1}): "
                    "tokenise with the model's own tokenizer"
                )
        if len(row) > max_tokens and truncation is Truncation.ERROR:
            raise InvalidArgument(
                f"token id list {index} has {len(row)} tokens but model {model!r} accepts at "
                f"most {max_tokens}: shorten it, or set truncation to END or START"
            )
        truncated.append(len(row) > max_tokens)
        if len(row) <= max_tokens:
            rows.append(row)
        elif truncation is Truncation.START:
            rows.append(row[-max_tokens:])
        else:
            rows.append(row[:max_tokens])
    packed = pack(rows)
    return TokenBatch(packed.ids, packed.offsets, np.array(truncated, dtype=bool), {})


def as_embed_error(error: BaseException) -> EmbedError:
    """A compute failure as the domain error the caller sees."""
    if isinstance(error, EmbedError):
        return error
    return EmbedError(f"computing the embeddings failed: {type(error).__name__}: {error}")


_EMPTY = np.zeros((0, 0), dtype=np.float32)


__all__ = [
    "EmbedError",
    "EmbedResult",
    "EmbeddingService",
    "GroupResult",
    "Limits",
    "ModelState",
    "ModelStatus",
]
