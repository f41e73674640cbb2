"""Gemma3 text encoders with bidirectional attention (EmbeddingGemma), model_type "gemma3_text".

The layers are mlx-lm's Gemma3 definitions; the masks are built here, because mlx-lm only
builds causal ones. With `use_bidirectional_attention` transformers lets every token see
every real token on full-attention layers, and on sliding-window layers only those with
|i - j| < sliding_window // 2 + 1 (it halves the window, keeping an exclusive bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ...errors import ModelLoadError
from .base import Pooling, decoder_weights, padding_mask
from .mlx_lm_defs import mlx_lm_model

_gemma3 = mlx_lm_model("gemma3_text")

DEFAULT_POOLING = Pooling.MEAN
DEFAULT_NORMALIZE = True
# EmbeddingGemma's prompts (its config_sentence_transformers.json, and TASK_PROMPTS in
# transformers' convert_gemma3_weights.py), for converted copies that dropped that file.
_SEARCH_QUERY = "task: search result | query: "
_DOCUMENT = "title: none | text: "
_SIMILARITY = "task: sentence similarity | query: "
DEFAULT_PROMPTS = {
    "query": _SEARCH_QUERY,
    "document": _DOCUMENT,
    "BitextMining": _SEARCH_QUERY,
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": _SIMILARITY,
    "Reranking": _SEARCH_QUERY,
    "Retrieval": _SEARCH_QUERY,
    "Retrieval-query": _SEARCH_QUERY,
    "Retrieval-document": _DOCUMENT,
    "STS": _SIMILARITY,
    "Summarization": "task: summarization | query: ",
}
# EmbeddingGemma's Matryoshka sizes below its native 768 (model card).
MATRYOSHKA_DIMENSIONS = (512, 256, 128)
CASTS_EMBEDDING_LOOKUPS = True

SLIDING = "sliding_attention"
FULL = "full_attention"


def sliding_pattern(layer_types: list[str]) -> int:
    """mlx-lm places full-attention layers by a period; find the one `layer_types` follows."""
    full = [i for i, kind in enumerate(layer_types) if kind == FULL]
    period = full[0] + 1 if full else len(layer_types) + 1
    expected = [FULL if (i + 1) % period == 0 else SLIDING for i in range(len(layer_types))]
    if layer_types != expected:
        raise ModelLoadError(
            f"layer_types {layer_types} do not repeat a fixed sliding/full pattern, "
            "which the mlx-lm Gemma3 layers require"
        )
    return period


def mlx_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """Translate a transformers config.json (4.x or 5.x layout) into mlx-lm's field names."""
    out = dict(config)
    # transformers 5 nests RoPE settings per layer type.
    rope = config.get("rope_parameters") or {}
    if isinstance(rope.get(FULL), dict):
        full = rope[FULL]
        out.setdefault("rope_theta", full.get("rope_theta"))
        if full.get("rope_type", "default") != "default":
            out["rope_scaling"] = full
    if isinstance(rope.get(SLIDING), dict):
        out.setdefault("rope_local_base_freq", rope[SLIDING].get("rope_theta"))
    layer_types = config.get("layer_types")
    if layer_types:
        out["sliding_window_pattern"] = sliding_pattern(list(layer_types))
    elif "_sliding_window_pattern" in config:
        out.setdefault("sliding_window_pattern", config["_sliding_window_pattern"])
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class ModelArgs:
    text: Any  # mlx_lm.models.gemma3_text.ModelArgs

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        if not config.get("use_bidirectional_attention"):
            raise ModelLoadError(
                "this gemma3_text checkpoint has causal attention (a text generator); "
                "akidb-embed serves gemma3_text embedding models with "
                "use_bidirectional_attention=true, such as EmbeddingGemma"
            )
        if config.get("attn_logit_softcapping"):
            raise ModelLoadError("gemma3_text with attn_logit_softcapping is not supported")
        return cls(_gemma3.ModelArgs.from_dict(mlx_lm_config(config)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = _gemma3.Gemma3Model(args.text)
        # config.json keeps the window transformers halves; see the module docstring.
        self.band = int(args.text.sliding_window) // 2 + 1

    @property
    def max_positions(self) -> int:
        return int(self.args.text.max_position_embeddings)

    def encode(self, input_ids: mx.array, lengths: mx.array) -> mx.array:
        inner = self.model
        dtype = inner.norm.weight.dtype
        h = inner.embed_tokens(input_ids).astype(dtype)
        # transformers scales in the weights' dtype: exact sqrt(hidden) in float32
        # (mlx-lm's Gemma3Model rounds it to bfloat16 first, 27.75 instead of 27.7128).
        h = h * mx.array(self.args.text.hidden_size**0.5, dtype=dtype)

        width = input_ids.shape[1]
        full = padding_mask(lengths, width)[:, None, None, :]  # (B, 1, 1, L): real keys
        positions = mx.arange(width)
        band = mx.abs(positions[:, None] - positions[None, :]) < self.band  # (L, L)
        sliding = full & band
        for layer in inner.layers:
            h = layer(h, sliding if layer.self_attn.is_sliding else full, None)
        hidden: mx.array = inner.norm(h)
        return hidden


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """EmbeddingGemma's keys have no `model.` prefix; mlx-community conversions have it."""
    return decoder_weights(weights)
