"""A FLOP bound: the model's matmul work for the corpus over the machine's fp32 GEMM rate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class BertShape:
    layers: int
    hidden: int
    intermediate: int


def bert_matmul_flops(lengths: Sequence[int], shape: BertShape) -> float:
    """Multiply-adds x 2 of every matmul (projections, FFN, QK^T, PV) for unpadded texts;
    embeddings, layer norms and softmax are not counted."""
    h, i = shape.hidden, shape.intermediate
    per_layer = sum(8 * n * h * h + 4 * n * h * i + 4 * n * n * h for n in lengths)
    return float(shape.layers * per_layer)


@dataclass(frozen=True)
class GemmRate:
    gflops: float
    size: int


def measure_gemm_rate(size: int = 1024, repeats: int = 7) -> GemmRate:
    """fp32 GEMM rate of this process's BLAS (all its threads), best of `repeats`."""
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return GemmRate(2 * size**3 / best / 1e9, size)
