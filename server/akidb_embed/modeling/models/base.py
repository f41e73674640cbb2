"""What every architecture shares: pooling, and the contract a model file fulfils.

A model file (`models/<model_type>.py`) defines `ModelArgs`, `Model` and `sanitize()`.
`Model.encode(input_ids, lengths)` takes right-padded ids (B, L) and the real lengths (B,)
and returns the last hidden states (B, L, H); padding never changes a real token's state.

Optional module-level facts the loader reads (a checkpoint's own files override them):
- `DEFAULT_POOLING`, `DEFAULT_NORMALIZE`: the pipeline when there is no modules.json.
- `DEFAULT_PROMPTS`: named prompts for checkpoints that ship none (no prompts in
  config_sentence_transformers.json, e.g. some converted copies).
- `INSTRUCTION_TEMPLATE`: e.g. "Instruct: {instruction}\nQuery:".
- `MATRYOSHKA_DIMENSIONS` (sizes below native), `MIN_DIMENSIONS` (any size from it up).
- `prepare_tokenizer(tokenizer)`: fix a `tokenizers.Tokenizer` in place before use.
- `CASTS_EMBEDDING_LOOKUPS = True`: `encode` casts looked-up embeddings to the compute dtype,
  so the precision policy may leave a (large) embedding table in its stored dtype.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

import mlx.core as mx


class Pooling(str, Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "last_token"


class EncoderModel(Protocol):
    def encode(self, input_ids: mx.array, lengths: mx.array) -> mx.array: ...


def padding_mask(lengths: mx.array, max_len: int) -> mx.array:
    """(B, L) boolean: True for real tokens of right-padded rows."""
    return mx.arange(max_len)[None, :] < lengths[:, None]


def pool(hidden: mx.array, lengths: mx.array, pooling: Pooling) -> mx.array:
    """Pool right-padded hidden states (B, L, H) over each row's real tokens."""
    if pooling is Pooling.CLS:
        return hidden[:, 0, :]
    if pooling is Pooling.LAST_TOKEN:
        index = (lengths - 1).astype(mx.int32)[:, None, None]
        return mx.take_along_axis(hidden, index, axis=1)[:, 0, :]
    mask = padding_mask(lengths, hidden.shape[1]).astype(hidden.dtype)[..., None]
    summed = (hidden * mask).sum(axis=1)
    return summed / mx.maximum(lengths.astype(hidden.dtype)[:, None], 1)


def decoder_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A decoder checkpoint's weights as the embedding model's keys: `model.`-prefixed, in
    either spelling (bare `layers.0...` or CausalLM's `model.layers.0...`), without the LM
    head and the rotary tables (computed, not loaded)."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
            continue
        out[key if key.startswith("model.") else f"model.{key}"] = value
    return out
