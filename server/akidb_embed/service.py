"""The domain facade the gRPC servicer calls: models by name, embedding, status.

No gRPC here. All MLX work goes through the ComputeWorker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx
import numpy as np

from . import __version__
from .batching import ComputeWorker
from .engine import EmbeddingEngine, EmbeddingSpace, EmbedOptions, PromptKind, finish
from .errors import (
    EmbedError,
    InvalidArgument,
    ModelLoadError,
    Overloaded,
    Unavailable,
)
from .loader import load_engine
from .metrics import Metrics
from .registry import LocatedModel, ModelEntry, Registry
from .residency import ModelBudget, ResidentModels
from .tokenization import TokenizedText, Truncation
from .workers import ModelSpec

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
    # Past this many queued tokens, unary calls get RESOURCE_EXHAUSTED.
    max_queued_tokens: int = 2_000_000
    # Embed calls with at most this many texts are queries: they skip the bulk queue.
    interactive_max_texts: int = 8


@dataclass(frozen=True)
class EmbeddedText:
    vector: np.ndarray
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class EmbedResult:
    model: str
    space: EmbeddingSpace
    embeddings: list[EmbeddedText]

    @property
    def total_tokens(self) -> int:
        return sum(e.token_count for e in self.embeddings)

    @property
    def vectors(self) -> np.ndarray:
        """float32 (n, dims), one row per input in input order."""
        if not self.embeddings:
            return np.zeros((0, self.space.dimensions), dtype=np.float32)
        return np.stack([e.vector for e in self.embeddings]).astype(np.float32, copy=False)

    @property
    def token_counts(self) -> list[int]:
        return [e.token_count for e in self.embeddings]

    @property
    def truncated(self) -> list[bool]:
        return [e.truncated for e in self.embeddings]


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
        worker: ComputeWorker,
        limits: Limits | None = None,
        budget: ModelBudget | None = None,
        allow_downloads: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.worker = worker
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.residents = ResidentModels(budget or ModelBudget())
        # Pull a known model that is not cached on first request, instead of
        # FAILED_PRECONDITION with the pull command.
        self.allow_downloads = allow_downloads
        # Told when a model starts (True) or stops (False) serving: the server's health.
        self.on_model_change: Callable[[str, bool], Awaitable[None]] | None = None
        self.started_at = time.monotonic()
        self.accepting = True
        # True once the preloaded models are warm (the server flips it).
        self.ready = False
        self._loading: dict[str, asyncio.Future[EmbeddingEngine]] = {}
        self._failed: dict[str, str] = {}

    @property
    def version(self) -> str:
        return __version__

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
        if self.worker.pool is not None:
            await asyncio.to_thread(self.worker.pool.unload, name)
        # Give the freed buffers back; MLX keeps a cache otherwise.
        await asyncio.wrap_future(self.worker.call(mx.clear_cache))
        log.info("unloaded model %s", name)
        await self._notify(name, False)

    async def unload_expired(self) -> None:
        """Unload idle on-demand models past the keep-alive (the server calls this)."""
        for name in self.residents.expired():
            await self.unload(name)

    async def _make_room(self, entry: ModelEntry, size_bytes: int) -> None:
        victims = self.residents.evictions_for(size_bytes)
        if victims is None:
            budget = self.residents.budget
            raise Overloaded(
                f"loading {entry.name!r} would exceed the model budget "
                f"(max {budget.max_models or 'any'} models, "
                f"{budget.max_bytes or 'any'} bytes) and every loaded model is busy or "
                "preloaded; retry later, or raise --max-loaded-models / --max-loaded-bytes"
            )
        for name in victims:
            await self.unload(name)

    async def _load(self, entry: ModelEntry) -> EmbeddingEngine:
        # A pull can take minutes: its own thread, never the compute thread.
        located = await asyncio.to_thread(
            self.registry.ensure,
            entry,
            allow_download=self.allow_downloads,
            notify=lambda message: log.info("%s: %s", entry.name, message),
        )
        await self._make_room(entry, located.size_bytes)
        started = time.monotonic()
        log.info("loading model %s from %s", entry.name, located.directory)

        def load_and_warm() -> EmbeddingEngine:
            engine = load_engine(
                located.directory, name=entry.name, source=entry.source, revision=located.revision
            )
            # Warm-up: the first forward compiles kernels and allocates buffers.
            warm = engine.forward([t.ids for t in engine.tokenize(["warm up"], EmbedOptions())])
            # Weights that parse but hold NaN/inf would answer every request with NaNs.
            if not np.isfinite(warm).all():
                raise ModelLoadError(
                    f"model {entry.name!r} in {located.directory} gives non-finite outputs "
                    "(NaN or inf) on a warm-up text: its weights are damaged; "
                    "delete the model and pull it again"
                )
            if self.worker.pool is not None:
                spec = ModelSpec(entry.name, located.directory, entry.source, located.revision)
                self.worker.pool.load(spec)
            return engine

        try:
            with self.metrics.time_model_load(entry.name):
                engine = await asyncio.wrap_future(self.worker.call(load_and_warm))
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ModelLoadError)
                else ModelLoadError(f"model {entry.name!r} failed to load: {exc}")
            )
            self._failed[entry.name] = error.message
            log.error("model %s failed to load: %s", entry.name, error.message)
            await self._notify(entry.name, False)
            raise error from exc
        self._failed.pop(entry.name, None)
        self.residents.add(engine, pinned=False)
        log.info("model %s ready in %.2fs", entry.name, time.monotonic() - started)
        await self._notify(entry.name, True)
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

    async def embed(self, model: str, texts: Sequence[str], options: EmbedOptions) -> EmbedResult:
        """Embed a batch; any bad text fails the whole call with an error naming it."""
        self._check_accepting()
        self._check_texts(texts)
        engine = await self.engine(model)
        with self.residents.use(engine.name):
            return await self._embed(engine, texts, options)

    async def _embed(
        self, engine: EmbeddingEngine, texts: Sequence[str], options: EmbedOptions
    ) -> EmbedResult:
        space = engine.space(options)
        # Large batches tokenise off the event loop so other calls keep flowing.
        with self.metrics.time_tokenize(engine.name):
            if len(texts) > 16:
                tokenized = await asyncio.to_thread(engine.tokenize, texts, options)
            else:
                tokenized = engine.tokenize(texts, options)
        if self.worker.queued_tokens > self.limits.max_queued_tokens:
            raise Overloaded(
                f"the server has {self.worker.queued_tokens} tokens queued (limit "
                f"{self.limits.max_queued_tokens}); retry with backoff or use EmbedStream"
            )
        interactive = len(texts) <= self.limits.interactive_max_texts
        futures = [self.worker.submit(engine, t.ids, interactive) for t in tokenized]
        vectors = await gather_vectors(futures)
        return EmbedResult(
            model=engine.name,
            space=space,
            embeddings=[
                EmbeddedText(
                    finish(vector, space.dimensions, options.normalize),
                    len(t.ids),
                    t.truncated,
                )
                for vector, t in zip(vectors, tokenized, strict=True)
            ],
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
        with self.residents.use(engine.name):
            tokenized = check_token_ids(
                ids,
                engine.name,
                engine.tokenizer.vocab_size,
                engine.tokenizer.max_tokens,
                options.truncation,
            )
            space = engine.space(options)
            if self.worker.queued_tokens > self.limits.max_queued_tokens:
                raise Overloaded(
                    f"the server has {self.worker.queued_tokens} tokens queued (limit "
                    f"{self.limits.max_queued_tokens}); retry with backoff"
                )
            interactive = len(ids) <= self.limits.interactive_max_texts
            futures = [self.worker.submit(engine, t.ids, interactive) for t in tokenized]
            vectors = await gather_vectors(futures)
        return EmbedResult(
            model=engine.name,
            space=space,
            embeddings=[
                EmbeddedText(
                    finish(vector, space.dimensions, options.normalize), len(t.ids), t.truncated
                )
                for vector, t in zip(vectors, tokenized, strict=True)
            ],
        )

    async def embed_item(
        self, model: str, text: str, options: EmbedOptions
    ) -> tuple[EmbeddedText, EmbeddingSpace]:
        """One stream item. No queue limit here: the stream's window bounds it."""
        self._check_accepting()
        check_text(text, None, self.limits.max_chars_per_text)
        engine = await self.engine(model)
        with self.residents.use(engine.name):
            return await self._embed_item(engine, text, options)

    async def _embed_item(
        self, engine: EmbeddingEngine, text: str, options: EmbedOptions
    ) -> tuple[EmbeddedText, EmbeddingSpace]:
        space = engine.space(options)
        with self.metrics.time_tokenize(engine.name):
            [tokenized] = engine.tokenize([text], options)
        [vector] = await gather_vectors([self.worker.submit(engine, tokenized.ids)])
        embedded = EmbeddedText(
            finish(vector, space.dimensions, options.normalize),
            len(tokenized.ids),
            tokenized.truncated,
        )
        return embedded, space

    def statuses(self) -> list[ModelStatus]:
        out = []
        for entry in self.registry.entries():
            engine = self.residents.get(entry.name)
            located = self.registry.locate(entry)
            reason = ""
            if engine is not None:
                state = ModelState.LOADED
            elif entry.name in self._loading:
                state = ModelState.LOADING
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
) -> list[TokenizedText]:
    """Validate token id lists for `model` and cut the long ones by `truncation`."""
    out = []
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
        if len(row) <= max_tokens:
            out.append(TokenizedText(list(row), False))
        elif truncation is Truncation.ERROR:
            raise InvalidArgument(
                f"token id list {index} has {len(row)} tokens but model {model!r} accepts at "
                f"most {max_tokens}: shorten it, or set truncation to END or START"
            )
        elif truncation is Truncation.START:
            out.append(TokenizedText(list(row[-max_tokens:]), True))
        else:
            out.append(TokenizedText(list(row[:max_tokens]), True))
    return out


async def gather_vectors(futures: list[concurrent.futures.Future[np.ndarray]]) -> list[np.ndarray]:
    """Await compute futures; if the caller goes away, cancel what has not run yet."""
    wrapped = [asyncio.wrap_future(f) for f in futures]
    try:
        return list(await asyncio.gather(*wrapped))
    except BaseException:
        for f in futures:
            f.cancel()
        raise


__all__ = [
    "EmbedError",
    "EmbedResult",
    "EmbeddedText",
    "EmbeddingService",
    "Limits",
    "ModelState",
    "ModelStatus",
]
