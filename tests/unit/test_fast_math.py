"""The fast GELU and softmax against float64 references (math.erf, numpy exp)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from akidb_embed.modeling.models import fast_math

_erf = np.vectorize(math.erf)


def exact_gelu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return np.asarray(0.5 * x64 * (1 + _erf(x64 / math.sqrt(2))))


def test_gelu_is_within_float32_noise_of_the_exact_erf_gelu() -> None:
    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    got = np.array(fast_math.gelu(mx.array(x)))
    ours = np.abs(got - exact_gelu(x)).max()
    theirs = np.abs(np.array(mx.array(x) * 0.5 * (1 + mx.erf(mx.array(x) / math.sqrt(2))))
                    - exact_gelu(x)).max()  # fmt: skip
    print(f"GELU max abs error: fast {ours:.2e}, MLX erf {theirs:.2e}")
    assert ours < 2e-6
    # Relative, where float32 itself has no cancellation (x > 0: 1 + erf >= 1).
    positive = x > 1e-3
    relative = np.abs(got - exact_gelu(x))[positive] / exact_gelu(x)[positive]
    assert relative.max() < 1e-6


def test_gelu_saturates_exactly_to_relu_for_large_inputs() -> None:
    x = np.array([7.0, -7.0, 1e3, -1e3, 1e30, -1e30, 3e38, -3e38], dtype=np.float32)
    got = np.array(fast_math.gelu(mx.array(x)))
    np.testing.assert_array_equal(got, np.maximum(x, 0))


def test_gelu_works_on_every_shape_and_keeps_other_dtypes() -> None:
    for shape in [(1,), (3, 5), (2, 7, 11)]:
        x = mx.random.normal(shape)
        np.testing.assert_allclose(np.array(fast_math.gelu(x)), exact_gelu(np.array(x)), atol=2e-6)
    half = mx.array([0.5, -1.0, 2.0], dtype=mx.float16)
    assert fast_math.gelu(half).dtype == mx.float16


def test_exp_negative_is_within_an_ulp_or_two() -> None:
    u = np.linspace(0, 87, 400_001, dtype=np.float32)
    got = np.array(fast_math.exp_negative(mx.array(u))).astype(np.float64)
    expected = np.exp(-u.astype(np.float64))
    relative = np.abs(got - expected) / expected
    print(f"exp max relative error {relative.max():.2e}")
    assert relative.max() < 2.5e-7


def test_exp_negative_of_huge_or_infinite_input_is_negligible() -> None:
    got = np.array(fast_math.exp_negative(mx.array([100.0, 1e30, np.inf], dtype=mx.float32)))
    assert np.all(got >= 0) and np.all(got < 1e-37)


@pytest.mark.parametrize("length", [1, 7, 64])
def test_softmax_parts_match_mlx_softmax_with_a_padding_bias(length: int) -> None:
    scores = mx.random.normal((3, 4, length, length)) * 4
    real = max(1, length - 3)
    bias = mx.where(mx.arange(length) < real, 0.0, -mx.inf)[None, None, None, :]
    e, sums = fast_math.softmax_parts(scores + bias)
    expected = mx.softmax(scores + bias, axis=-1, precise=True)
    np.testing.assert_allclose(np.array(e / sums), np.array(expected), atol=2e-7)
    # Padded keys get (almost) nothing: below float32's resolution next to a real key.
    assert float((e / sums)[..., real:].max()) < 1e-30 if real < length else True
