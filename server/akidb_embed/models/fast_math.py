"""GELU and softmax for MLX's CPU backend, made of ops it runs fast.

MLX on CPU evaluates erf and exp one element at a time (~20 ns each; erf GELU was most of a
BERT forward). Here erf is a rational function and exp a polynomial times a power of two
built with integer ops. `mx.compile` fuses each chain into one vectorised loop: it compiles
elementwise graphs of depth <= 11 into one kernel, so the polynomials use Estrin's scheme
(shallow) rather than Horner's. Clamps go through the integer view of the float: MLX's
float minimum checks for NaN per element, which stops the loop from vectorising.

Accuracy (tests/unit/test_fast_math.py): GELU within 1.3e-6 absolute of the exact erf GELU
on [-12, 12] (MLX's own erf GELU: 4.7e-7); exp within 1.1e-7 relative (MLX's exp: 3.9e-6).
Coefficients from scripts/fit_fast_math.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# erf(a) ~ a * P(a^2) / Q(a^2) for 0 <= a <= ERF_LIMIT; erf(ERF_LIMIT) rounds to 1.0.
ERF_LIMIT = 3.8
ERF_P = (
    1.128379075227728,
    0.18811206484055207,
    0.052546588786560176,
    0.0036933827992727667,
    0.00028798483728894773,
    2.13203775022553e-06,
)
ERF_Q = (
    1.0,
    0.5000422360330854,
    0.11325300765734087,
    0.014822471197553857,
    0.001153671850410839,
    3.909611992011881e-05,
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
# ln 2 split so n * LN2_HI is exact for |n| < 2^10 (Cody-Waite reduction).
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
# Adding 1.5 * 2^23 rounds a float32 to an integer, left in the low mantissa bits.
ROUNDER = 12582912.0
# exp(-87) is near the smallest normal float32; below it 2^n would underflow the exponent.
EXP_FLOOR = 87.0


def float_bits(value: float) -> int:
    """The int32 whose bits are float32 `value` (for comparisons in the integer view)."""
    return int(np.array([value], dtype=np.float32).view(np.int32)[0])


ERF_LIMIT_BITS = float_bits(ERF_LIMIT)
EXP_FLOOR_BITS = float_bits(EXP_FLOOR)
ROUNDER_BITS = float_bits(ROUNDER)


def min_nonnegative(x: mx.array, limit_bits: int) -> mx.array:
    """min(x, limit) for x >= 0: non-negative float32 order the same as their bits."""
    return mx.view(mx.minimum(mx.view(x, mx.int32), limit_bits), mx.float32)


def estrin(coeffs: Sequence[float], t: mx.array, t2: mx.array) -> mx.array:
    """sum(c_i t^i), grouped in pairs so the graph is shallow."""
    pairs = [coeffs[i] + coeffs[i + 1] * t for i in range(0, len(coeffs) - 1, 2)]
    acc = pairs.pop() if len(coeffs) % 2 == 0 else coeffs[-1] * t2 + pairs.pop()
    for pair in reversed(pairs):
        acc = pair + t2 * acc
    return acc


def _gelu(x: mx.array) -> mx.array:
    # 0.5 x (1 + erf(x / sqrt 2)) = 0.5 (x + |x| erf(|x| / sqrt 2)): erf is odd.
    magnitude = mx.abs(x)
    a = min_nonnegative(magnitude * (1 / math.sqrt(2)), ERF_LIMIT_BITS)
    t = a * a
    t2 = t * t
    erf = a * estrin(ERF_P, t, t2) / estrin(ERF_Q, t, t2)
    return 0.5 * (x + magnitude * erf)


def _exp_negative(u: mx.array) -> mx.array:
    """exp(-u) for u >= 0 (+inf gives ~1e-38)."""
    u = min_nonnegative(u, EXP_FLOOR_BITS)
    rounded = u * -1.4426950408889634 + ROUNDER
    n = rounded - ROUNDER
    r = (n * -LN2_HI - u) - n * LN2_LO
    r2 = r * r
    power_of_two = mx.view((mx.view(rounded, mx.int32) - (ROUNDER_BITS - 127)) << 23, mx.float32)
    return estrin(EXP_C, r, r2) * power_of_two


def _softmax(scores: mx.array, bias: mx.array, scale: float) -> mx.array:
    z = scores * scale + bias
    e = _exp_negative(z.max(axis=-1, keepdims=True) - z)
    return e * (1 / e.sum(axis=-1, keepdims=True))


# Not shapeless: `mx.view` needs shapes; a trace per input shape is cached.
_gelu_f32 = mx.compile(_gelu)
_softmax_f32 = mx.compile(_softmax)
exp_negative = mx.compile(_exp_negative)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU. The bit tricks assume float32; other dtypes take MLX's."""
    return _gelu_f32(x) if x.dtype == mx.float32 else nn.gelu(x)


def softmax(scores: mx.array, bias: mx.array, scale: float) -> mx.array:
    """softmax(scores * scale + bias) over the last axis; bias is 0 or -inf."""
    if scores.dtype == mx.float32:
        return _softmax_f32(scores, bias, scale)
    return mx.softmax(scores * scale + bias, axis=-1, precise=True)
