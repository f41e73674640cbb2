"""GELU and softmax for MLX's CPU backend, made of the ops it runs fast.

MLX on CPU evaluates erf and exp one element at a time (~20 ns each; the erf GELU was most
of a BERT forward). Here erf is a rational function and exp a polynomial times a power of
two built from the float's bits. Three things keep them fast:
- `mx.compile` fuses an elementwise chain into one loop the C++ compiler vectorises, but
  only from mul/add/div/abs-like ops: its `minimum`/`maximum` check for NaN per element
  and stay scalar (~8x slower), so clamps inside compiled code are built from `abs`.
- An input broadcast inside a compiled function makes its loop strided and scalar, so
  broadcasts (the softmax row max and sum) stay outside, as eager ops, which vectorise.
- `mx.view` (the bit cast) cannot be traced shapelessly; it stays outside too, so the
  compiled parts are `shapeless` and never re-trace for a new batch shape.

Accuracy, float32, against float64 references (tests/unit/test_fast_math.py): GELU within
~1e-6 absolute of the exact erf GELU on [-12, 12] and exactly relu(x) beyond
|x| > 4.5 * sqrt(2); exp within ~1.2e-7 relative (MLX's own exp: 3.9e-6).
Coefficients from scripts/fit_fast_math.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

# erf(a) ~ a * P(a^2) / Q(a^2) for 0 <= a <= ERF_LIMIT; exactly 1.0 at the limit.
ERF_LIMIT = 4.5
ERF_P = (
    1.128378407006851,
    0.2245431315303801,
    0.05717268425556351,
    0.005191420421676585,
    0.00031099335469871893,
    1.7218902719615566e-06,
)
ERF_Q = (
    1.0,
    0.5323212620038938,
    0.12813715924167063,
    0.01784472286903396,
    0.0014960414310471314,
    3.6025697066861455e-05,
)
# exp(r) ~ E(r) for |r| <= ln2 / 2.
EXP_C = (
    1.0000000005541752,
    1.0000000363226789,
    0.49999992079535654,
    0.16666420170877322,
    0.041668225644717886,
    0.008374815793407629,
    0.0013836841682441914,
)
LOG2E = 1.4426950408889634
# ln 2 split so n * LN2_HI is exact for the n used here (Cody-Waite reduction).
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
# Adding 1.5 * 2^23 rounds a float32 to an integer, left in the low mantissa bits.
ROUNDER = 12582912.0
# exp(-87) is near the smallest normal float32; past it 2^n would underflow the exponent.
EXP_FLOOR = 87.0


def float_bits(value: float) -> int:
    """The int32 whose bits are float32 `value`."""
    return int(np.array([value], dtype=np.float32).view(np.int32)[0])


# view(rounded) - EXPONENT_OFFSET = n + 127, the biased exponent of 2^n.
EXPONENT_OFFSET = float_bits(ROUNDER) - 127


def estrin(coeffs: Sequence[float], t: mx.array, t2: mx.array) -> mx.array:
    """sum(c_i t^i), grouped in pairs so the graph stays shallow (mx.compile fuses a
    chain at most 11 ops deep into one kernel)."""
    pairs = [coeffs[i] + coeffs[i + 1] * t for i in range(0, len(coeffs) - 1, 2)]
    acc = pairs.pop() if len(coeffs) % 2 == 0 else coeffs[-1] * t2 + pairs.pop()
    for pair in reversed(pairs):
        acc = pair + t2 * acc
    return acc


def _erf_input(x: mx.array) -> mx.array:
    """min(|x| / sqrt 2, ERF_LIMIT), without `minimum`: exactly the limit above it (where
    the rational is exactly 1), within half an ulp of the limit below it."""
    a = mx.abs(x) * (1 / math.sqrt(2))
    gap = ERF_LIMIT - a
    return ERF_LIMIT - 0.5 * (gap + mx.abs(gap))


def _gelu_from(x: mx.array, a: mx.array) -> mx.array:
    # 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x + 0.5 |x| erf(|x| / sqrt 2): erf is odd.
    t = a * a
    t2 = t * t
    erf = a * estrin(ERF_P, t, t2) / estrin(ERF_Q, t, t2)
    return 0.5 * x + (0.5 * mx.abs(x)) * erf


def _exp_parts(u: mx.array) -> tuple[mx.array, mx.array]:
    """For 0 <= u <= EXP_FLOOR: E(r), and 2^n's exponent bits as a float (exp(-u) = E 2^n)."""
    rounded = u * -LOG2E + ROUNDER
    n = rounded - ROUNDER
    r = (n * -LN2_HI - u) - n * LN2_LO
    return estrin(EXP_C, r, r * r), rounded


# Two compiled functions, not one: left to itself mx.compile splits the chain at a point
# where a shared constant becomes a broadcast input, and the second kernel runs strided
# (3x slower). Shape-specialised: `shapeless` kernels are ~1.5x slower.
_erf_input_f32 = mx.compile(_erf_input)
_gelu_from_f32 = mx.compile(_gelu_from)
_exp_parts_f32 = mx.compile(_exp_parts)
_exponent_bits = mx.compile(lambda rounded_bits: (rounded_bits - EXPONENT_OFFSET) << 23)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU. Other dtypes than float32 take MLX's."""
    if x.dtype != mx.float32:
        return 0.5 * x * (1 + mx.erf(x * (1 / math.sqrt(2))))
    return _gelu_from_f32(x, _erf_input_f32(x))


def exp_negative(u: mx.array) -> mx.array:
    """exp(-u) for float32 u >= 0; +inf gives ~1.6e-38, not 0."""
    poly, rounded = _exp_parts_f32(mx.minimum(u, EXP_FLOOR))
    return poly * mx.view(_exponent_bits(mx.view(rounded, mx.int32)), mx.float32)


def softmax_parts(scores: mx.array) -> tuple[mx.array, mx.array]:
    """Unnormalised softmax over the last axis and its sums: softmax = e / sums.

    Returning the sums lets the caller divide a smaller tensor (attention's output).
    """
    if scores.dtype != mx.float32:
        e = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    else:
        e = exp_negative(scores.max(axis=-1, keepdims=True) - scores)
    return e, e.sum(axis=-1, keepdims=True)
