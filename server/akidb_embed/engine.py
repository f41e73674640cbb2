"""A loaded embedding model: tokenizer, MLX network, pooling head and the facts about it.

Domain code only: no gRPC. `forward` must run on the compute thread (batching.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import mlx.core as mx
import numpy as np

from .errors import InvalidArgument
from .models.base import EncoderModel, Pooling, pool
from .tokenization import TextTokenizer, TokenizedText, Truncation


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


@dataclass(frozen=True)
class EmbeddingSpace:
    model_id: str
    revision: str
    dimensions: int
    pooling: Pooling
    normalized: bool
    dtype: str

    @property
    def fingerprint(self) -> str:
        key = "|".join(
            [
                self.model_id,
                self.revision,
                str(self.dimensions),
                self.pooling.value,
                str(self.normalized),
                self.dtype,
            ]
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


# A module applied to pooled vectors (e.g. sentence-transformers Dense layers).
Head = Callable[[mx.array], mx.array]


class EmbeddingEngine:
    def __init__(
        self,
        *,
        name: str,
        source: str,
        revision: str,
        profile: ModelProfile,
        tokenizer: TextTokenizer,
        model: EncoderModel,
        heads: Sequence[Head] = (),
        pad_id: int = 0,
        memory_bytes: int = 0,
    ) -> None:
        self.name = name
        self.source = source
        self.revision = revision
        self.profile = profile
        self.tokenizer = tokenizer
        self.model = model
        self.heads = list(heads)
        self.pad_id = pad_id
        self.memory_bytes = memory_bytes

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
        prefix = self.prefix(options)
        return self.tokenizer.encode([prefix + t for t in texts], options.truncation)

    def space(self, options: EmbedOptions) -> EmbeddingSpace:
        return EmbeddingSpace(
            model_id=self.source,
            revision=self.revision,
            dimensions=self.profile.check_dimensions(options.dimensions),
            pooling=self.profile.pooling,
            normalized=options.normalize,
            dtype=self.profile.dtype,
        )

    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled float32 vectors (B, native dim), before normalisation. Compute thread only."""
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        padded = np.full((len(batch), width), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(batch):
            padded[row, : len(ids)] = ids
        length_arr = mx.array(lengths, dtype=mx.int32)
        hidden = self.model.encode(mx.array(padded), length_arr)
        pooled = pool(hidden, length_arr, self.profile.pooling)
        for head in self.heads:
            pooled = head(pooled)
        pooled = pooled.astype(mx.float32)
        mx.eval(pooled)
        return np.array(pooled, copy=False)


def finish(vector: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka-truncate, then L2-normalise if asked."""
    out = vector[:dimensions].astype(np.float32, copy=True)
    if normalize:
        norm = float(np.linalg.norm(out))
        if norm > 0:
            out /= norm
    return out
