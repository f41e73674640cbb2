"""BERT encoders (BERT, MiniLM, bge, e5, ...) in MLX, keyed by model_type "bert".

Module names follow the Hugging Face checkpoint layout so weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fast_math
from .base import padding_mask


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in fields})


_ACTIVATIONS = {
    # Exact (erf) GELU from mul/add/div: MLX's CPU erf is one element at a time.
    "gelu": fast_math.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])[None, :]
        # Single-segment inputs: token type 0 everywhere.
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(h)


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.scale = (args.hidden_size // args.num_attention_heads) ** -0.5
        self.query = nn.Linear(args.hidden_size, args.hidden_size)
        self.key = nn.Linear(args.hidden_size, args.hidden_size)
        self.value = nn.Linear(args.hidden_size, args.hidden_size)

    def __call__(self, x: mx.array, bias: mx.array | None) -> mx.array:
        b, n, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.n_heads, -1).transpose(0, 2, 1, 3)

        # Scaling q also lays it out contiguously for the matmul.
        q = heads(self.query(x)) * self.scale
        k, v = heads(self.key(x)), heads(self.value(x))
        scores = q @ k.swapaxes(-1, -2)
        if bias is not None:
            scores = scores + bias
        # sdpa's CPU path masks with `where` and runs MLX's scalar exp; this is ~3x faster.
        # Normalising after the value product divides (B, H, L, d), not (B, H, L, L).
        e, sums = fast_math.softmax_parts(scores)
        out = (e @ v) / sums
        return out.transpose(0, 2, 1, 3).reshape(b, n, -1)


class DenseNorm(nn.Module):
    """A projection, residual and LayerNorm (BERT's "output" blocks)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self = SelfAttention(args)
        self.output = DenseNorm(args.hidden_size, args.hidden_size, args.layer_norm_eps)

    def __call__(self, x: mx.array, bias: mx.array | None) -> mx.array:
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.intermediate_size)
        if args.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {args.hidden_act!r} is not supported; "
                f"supported: {', '.join(sorted(_ACTIVATIONS))}"
            )
        self.act = _ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        if not isinstance(self.dense, nn.Linear):  # e.g. a bf16 layer (cpu_bf16.py)
            return self.act(self.dense(x))
        # Not nn.Linear's addmm: on CPU it fills the wide output with the broadcast bias
        # first, slowly (+50% on this matmul); an add after the product is ~0.5 ns a value.
        return self.act((x @ self.dense.weight.T) + self.dense.bias)


class Layer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.intermediate = Intermediate(args)
        self.output = DenseNorm(args.intermediate_size, args.hidden_size, args.layer_norm_eps)

    def __call__(self, x: mx.array, bias: mx.array | None) -> mx.array:
        h = self.attention(x, bias)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.layer = [Layer(args) for _ in range(args.num_hidden_layers)]


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def encode(self, input_ids: mx.array, lengths: mx.array) -> mx.array:
        h = self.embeddings(input_ids)
        bias = None
        # Read on the host (the lengths come from numpy): a graph evaluation here would
        # cost a round trip to the compute stream on every batch.
        if int(np.asarray(lengths).min()) < input_ids.shape[1]:
            # (B, 1, 1, L) additive: every query attends to the real keys of its row.
            keep = padding_mask(lengths, input_ids.shape[1])[:, None, None, :]
            bias = mx.where(keep, 0.0, -mx.inf).astype(h.dtype)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return h


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map Hugging Face BERT checkpoint keys onto `Model`'s parameter names."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.startswith("bert."):
            key = key[len("bert.") :]
        if key.startswith(("pooler.", "cls.")) or key.endswith("position_ids"):
            continue  # the pooler head and MLM head are not part of the encoder
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[key] = value
    return out
