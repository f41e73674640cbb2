"""A loaded embedding model, in two halves.

The front (EmbeddingEngine: tokenizer, profile, embedding spaces, calibration) lives in the
server process. The back (Network: the MLX network and its pooling heads) lives in whichever
process computes: the server's own compute thread, or each engine worker process
(workers.py), in which case the server holds no weights and the front's `compute` sends
batches to the workers.

Domain code only: no gRPC. A local network's `forward_packed` must run on the compute thread
(batching.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgument, ModelLoadError, ModelNotAvailable
from .chunking import Chunks
from .encodings import Encoding, Ranges
from .models.base import EncoderModel, Pooling, pool
from .tokenization import TextTokenizer, TokenBatch, TokenizedText, Truncation, pack


def release_thread_streams() -> None:
    """Free the MLX streams the calling thread made; a thread that computed calls it as it ends.

    MLX keeps streams per thread and does not free them by itself: a thread that still owns
    one while the interpreter finalizes aborts the process ("terminate called without an
    active exception")."""
    mx.clear_streams()


@dataclass(frozen=True)
class ModelProfile:
    """Facts about a model, read from its own files."""

    architecture: str
    dimensions: int
    max_tokens: int
    pooling: Pooling
    normalize: bool
    dtype: str
    prompts: Mapping[str, str] = field(default_factory=dict)
    # Advertised Matryoshka sizes; with `min_dimensions` any size in [min, native] works.
    matryoshka_dimensions: tuple[int, ...] = ()
    min_dimensions: int | None = None
    # e.g. "Instruct: {instruction}\nQuery:" for Qwen3-Embedding.
    instruction_template: str | None = None

    def check_dimensions(self, dimensions: int) -> int:
        """The output size for a requested `dimensions` (0 = native); raises if unsupported."""
        if dimensions in (0, self.dimensions):
            return self.dimensions
        if dimensions in self.matryoshka_dimensions or (
            self.min_dimensions is not None and self.min_dimensions <= dimensions < self.dimensions
        ):
            return dimensions
        if self.min_dimensions is not None:
            allowed = f"any value from {self.min_dimensions} to {self.dimensions}"
        elif self.matryoshka_dimensions:
            allowed = "one of " + ", ".join(map(str, sorted(self.matryoshka_dimensions)))
        else:
            allowed = f"{self.dimensions} (this model has no Matryoshka sizes) or 0"
        raise InvalidArgument(f"dimensions={dimensions} is not supported; use {allowed}")


class PromptKind(Enum):
    NONE = "none"
    NAME = "name"
    LITERAL = "literal"
    INSTRUCTION = "instruction"


@dataclass(frozen=True)
class EmbedOptions:
    normalize: bool = True
    dimensions: int = 0
    truncation: Truncation = Truncation.END
    prompt_kind: PromptKind = PromptKind.NONE
    prompt_value: str = ""
    encoding: Encoding = Encoding.FLOAT32
    # Truncation.CHUNK: tokens per window (0: the model's maximum) and shared between windows.
    chunk_tokens: int = 0
    chunk_overlap: int = 0


@dataclass(frozen=True)
class EmbeddingSpace:
    model_id: str
    revision: str
    dimensions: int
    pooling: Pooling
    normalized: bool
    dtype: str
    encoding: Encoding = Encoding.FLOAT32
    # int8/uint8: the id of the ranges the vectors were quantised with.
    ranges_id: str = ""

    @cached_property
    def fingerprint(self) -> str:
        parts = [
            self.model_id,
            self.revision,
            str(self.dimensions),
            self.pooling.value,
            str(self.normalized),
            self.dtype,
        ]
        # float32 keeps the fingerprint it had before encodings existed.
        if self.encoding is not Encoding.FLOAT32:
            parts += [self.encoding.value, self.ranges_id]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# A module applied to pooled vectors (e.g. sentence-transformers Dense layers).
Head = Callable[[mx.array], mx.array]
# Pooled float32 vectors (B, native dim) of B texts whose ids lie back to back.
Compute = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Network:
    """The back half: the MLX network, its pooling and heads. Holds the weights."""

    def __init__(
        self,
        model: EncoderModel,
        pooling: Pooling,
        heads: Sequence[Head] = (),
        pad_id: int = 0,
        memory_bytes: int = 0,
    ) -> None:
        self.model = model
        self.pooling = pooling
        self.heads = list(heads)
        self.pad_id = pad_id
        self.memory_bytes = memory_bytes

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Pooled float32 vectors (B, native dim), before normalisation, of B texts whose
        ids lie back to back in `ids`. The thread that owns this network's MLX work only."""
        lengths = np.asarray(lengths, dtype=np.int32)
        width = int(lengths.max())
        padded = np.full((len(lengths), width), self.pad_id, dtype=np.int32)
        # Row-major boolean assignment fills each row's first lengths[i] slots in order.
        padded[np.arange(width)[None, :] < lengths[:, None]] = ids
        length_arr = mx.array(lengths)
        hidden = self.model.encode(mx.array(padded), length_arr)
        pooled = pool(hidden, length_arr, self.pooling)
        for head in self.heads:
            pooled = head(pooled)
        pooled = pooled.astype(mx.float32)
        mx.eval(pooled)
        return np.array(pooled, copy=False)


@dataclass(frozen=True)
class NetworkFacts:
    """What loading a network decides, that the front needs: sent back by engine workers."""

    dtype: str
    dimensions: int
    memory_bytes: int


class EmbeddingEngine:
    """The front half: what the server needs to tokenise, check options and label vectors.

    With a local `network` it computes on the calling thread; with a `compute` function
    instead (engine workers) it holds no weights, and `memory_bytes` counts the copies the
    workers hold.
    """

    def __init__(
        self,
        *,
        name: str,
        source: str,
        revision: str,
        profile: ModelProfile,
        tokenizer: TextTokenizer,
        network: Network | None = None,
        compute: Compute | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        if network is not None:
            compute = network.forward_packed
            memory_bytes = network.memory_bytes if memory_bytes is None else memory_bytes
        if compute is None:
            raise ValueError("an engine computes with a local network or a compute function")
        self.name = name
        self.source = source
        self.revision = revision
        self.profile = profile
        self.tokenizer = tokenizer
        self.network = network
        self._compute = compute
        self.memory_bytes = memory_bytes or 0
        # Spaces by (dimensions, normalize, encoding): built once, not per request.
        self._spaces: dict[tuple[int, bool, Encoding], EmbeddingSpace] = {}
        # Pooled native vectors of the calibration corpus (model_records.py), for ranges.
        self.calibration: np.ndarray | None = None
        self.records_folder: Path | None = None
        self._ranges: dict[tuple[int, bool], Ranges] = {}
        # What the load-time self-check found (model_records.py), for ListModels.
        self.self_check = ""

    def prefix(self, options: EmbedOptions) -> str:
        kind, value = options.prompt_kind, options.prompt_value
        if kind is PromptKind.NONE:
            return ""
        if kind is PromptKind.LITERAL:
            return value
        if kind is PromptKind.NAME:
            if value not in self.profile.prompts:
                known = ", ".join(sorted(self.profile.prompts)) or "none"
                raise InvalidArgument(
                    f"model {self.name!r} has no prompt named {value!r}; its prompts: {known}"
                )
            return self.profile.prompts[value]
        template = self.profile.instruction_template
        if not value:
            prompts = ", ".join(sorted(self.profile.prompts)) or "none"
            raise InvalidArgument(
                "instruction is empty: describe the task, or use prompt_name "
                f"(model {self.name!r} prompts: {prompts})"
            )
        if template is None:
            raise InvalidArgument(
                f"model {self.name!r} has no instruction template; "
                "send a literal `prompt` or a `prompt_name` instead"
            )
        return template.format(instruction=value)

    def tokenize(self, texts: Sequence[str], options: EmbedOptions) -> list[TokenizedText]:
        """One object per text; raises on a text over the limit under ERROR (tests, tools)."""
        prefix = self.prefix(options)
        return self.tokenizer.encode([prefix + t for t in texts], options.truncation)

    def tokenize_batch(self, texts: Sequence[str], options: EmbedOptions) -> TokenBatch:
        """A group's ids packed in one array, with one batch call (the serving path)."""
        prefix = self.prefix(options)
        prefixed = [prefix + t for t in texts] if prefix else texts
        return self.tokenizer.encode_batch(prefixed, options.truncation)

    def ranges(self, dimensions: int, normalize: bool) -> Ranges:
        """int8/uint8 ranges at this output size: min and max per dimension of the
        calibration vectors, truncated and normalised as requests are."""
        dimensions = self.profile.check_dimensions(dimensions)
        key = (dimensions, normalize)
        ranges = self._ranges.get(key)
        if ranges is None:
            if self.calibration is None:
                raise ModelNotAvailable(
                    f"model {self.name!r} has no calibration yet, so int8/uint8 are not "
                    "available; it is calibrated when the server loads it"
                )
            ranges = Ranges.of(finish_batch(self.calibration, dimensions, normalize), normalize)
            self._ranges[key] = ranges
        return ranges

    def chunk_window(self, options: EmbedOptions) -> int:
        """Tokens per window under Truncation.CHUNK; raises on a size the model cannot take."""
        limit = self.profile.max_tokens
        if options.chunk_tokens > limit:
            raise InvalidArgument(
                f"chunk_tokens={options.chunk_tokens} is more than model {self.name!r} takes; "
                f"use 0 (its maximum, {limit}) or a value up to {limit}"
            )
        return options.chunk_tokens or limit

    def tokenize_chunks(
        self, texts: Sequence[str], options: EmbedOptions
    ) -> tuple[TokenBatch, Chunks]:
        """Truncation.CHUNK: one packed row per window, the prompt before each."""
        return self.tokenizer.encode_chunks(
            texts, self.prefix(options), self.chunk_window(options), options.chunk_overlap
        )

    def space(self, options: EmbedOptions) -> EmbeddingSpace:
        key = (options.dimensions, options.normalize, options.encoding)
        space = self._spaces.get(key)
        if space is None:
            ranges_id = ""
            if options.encoding.needs_ranges:
                ranges_id = self.ranges(options.dimensions, options.normalize).id
            space = EmbeddingSpace(
                model_id=self.source,
                revision=self.revision,
                dimensions=self.profile.check_dimensions(options.dimensions),
                pooling=self.profile.pooling,
                normalized=options.normalize,
                dtype=self.profile.dtype,
                encoding=options.encoding,
                ranges_id=ranges_id,
            )
            self._spaces[key] = space
        return space

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled float32 vectors (B, native dim) of id lists (tests, tools)."""
        packed = pack(batch)
        return self.forward_packed(packed.ids, packed.lengths)

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Pooled float32 vectors (B, native dim), before normalisation, of B texts whose
        ids lie back to back in `ids`. A local network: its compute thread only."""
        return self._compute(ids, lengths)

    @property
    def model(self) -> EncoderModel:
        """The local network's MLX model (tests, tools); an engine-worker front has none."""
        if self.network is None:
            raise ModelNotAvailable(f"model {self.name!r} computes in the engine workers")
        return self.network.model

    @property
    def heads(self) -> list[Head]:
        return [] if self.network is None else self.network.heads

    @property
    def facts(self) -> NetworkFacts:
        return NetworkFacts(self.profile.dtype, self.profile.dimensions, self.memory_bytes)

    def warm_up(self) -> np.ndarray:
        """Run one forward (kernels compile, buffers allocate); raise if the weights give
        non-finite outputs: such a model would answer every request with NaNs."""
        vectors = self.forward([t.ids for t in self.tokenize(["warm up"], EmbedOptions())])
        if not np.isfinite(vectors).all():
            raise ModelLoadError(
                f"model {self.name!r} gives non-finite outputs (NaN or inf) on a warm-up "
                "text: its weights are damaged; delete the model and pull it again"
            )
        return vectors


def finish(vector: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka-truncate, then L2-normalise if asked (one vector)."""
    return finish_batch(vector[None, :], dimensions, normalize)[0]


def finish_batch(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka-truncate rows (N, native) to (N, dimensions), then L2-normalise each if
    asked: one new contiguous float32 buffer, the one the response is sent from."""
    out = np.array(vectors[:, :dimensions], dtype=np.float32, order="C", copy=True)
    if normalize and len(out):
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out
