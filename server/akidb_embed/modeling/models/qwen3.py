"""Qwen3 decoders as embedding models (Qwen3-Embedding), keyed by model_type "qwen3".

The network is mlx-lm's Qwen3 definition. Attention is causal, so with right padding the
built-in causal mask is exact: a real token never sees the padding after it, and the
last-token pooling reads position length-1, the `<|endoftext|>` the tokenizer appends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer, processors

from ...errors import ModelLoadError
from .base import Pooling, decoder_weights
from .mlx_lm_defs import mlx_lm_model

_qwen3 = mlx_lm_model("qwen3")

DEFAULT_POOLING = Pooling.LAST_TOKEN
DEFAULT_NORMALIZE = True
# Qwen3-Embedding's documented query format: no space after "Query:"; documents go as is.
INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery:"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_PROMPTS = {
    "query": INSTRUCTION_TEMPLATE.format(instruction=DEFAULT_INSTRUCTION),
    "document": "",
}
# Trained with Matryoshka loss: any size from 32 to native (truncate, then normalise).
MIN_DIMENSIONS = 32
CASTS_EMBEDDING_LOOKUPS = True

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ModelArgs:
    text: Any  # mlx_lm.models.qwen3.ModelArgs

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        if config.get("use_sliding_window"):
            raise ModelLoadError(
                "this qwen3 checkpoint uses sliding-window attention, which akidb-embed does "
                "not implement; use a checkpoint with use_sliding_window=false"
            )
        return cls(_qwen3.ModelArgs.from_dict(config))


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = _qwen3.Qwen3Model(args.text)

    @property
    def max_positions(self) -> int:
        return int(self.args.text.max_position_embeddings)

    def encode(self, input_ids: mx.array, lengths: mx.array) -> mx.array:
        inner = self.model
        # The embedding table may be kept in its stored dtype (precision policy).
        embeddings = inner.embed_tokens(input_ids).astype(inner.norm.weight.dtype)
        hidden: mx.array = inner(input_ids, input_embeddings=embeddings)
        return hidden


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Accept Qwen3Model keys (`layers.0...`) and mlx-lm/CausalLM keys (`model.layers.0...`)."""
    return decoder_weights(weights)


def prepare_tokenizer(tokenizer: Tokenizer) -> None:
    """Make sure every text ends with `<|endoftext|>`, the token last-token pooling reads.

    Current Qwen3-Embedding tokenizer.json files append it in their post_processor; older
    ones do not, and then the pooled state would be the last word's.
    """
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ModelLoadError(
            f"the tokenizer has no {EOS_TOKEN} token, which Qwen3 embedding models pool on"
        )
    if tokenizer.encode("a").ids[-1:] == [eos_id]:
        return
    append_eos = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    current = tokenizer.post_processor
    tokenizer.post_processor = (
        append_eos if current is None else processors.Sequence([current, append_eos])
    )
