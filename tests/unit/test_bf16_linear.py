"""The compiled bf16 linear primitive (ext/bf16) against MLX's fp32 matmul.

Skipped where the extension is not built (`make native`) or oneDNN has no bf16 matmul for
this CPU (AVX2 alone). The bound: inputs and weights are rounded to bf16 (8 bits of mantissa,
relative error <= 2^-9 each) and products accumulate in fp32, so for random normal data the
error is a small multiple of 2^-8 * |x| |w| sqrt(K).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from akidb_embed.modeling import cpu_bf16

ext = cpu_bf16.extension()
pytestmark = pytest.mark.skipif(not cpu_bf16.runnable(), reason=cpu_bf16.unavailable_reason())


def bf16_round(a: mx.array) -> mx.array:
    return a.astype(mx.bfloat16).astype(mx.float32)


def check(x: mx.array, weight: mx.array, bias: mx.array | None) -> None:
    assert ext is not None
    packed = ext.PackedLinear(weight, bias)
    got = ext.linear(x, packed)
    # The same bf16-rounded operands in fp32: what oneDNN computes up to summation order.
    exact = bf16_round(x) @ bf16_round(weight).T
    plain = x @ weight.T
    if bias is not None:
        exact, plain = exact + bias, plain + bias
    mx.eval(got, exact, plain)
    assert got.shape == (*x.shape[:-1], weight.shape[0])
    assert got.dtype == mx.float32
    k = x.shape[-1]
    scale = float(mx.abs(plain).max()) + 1e-6
    # Against bf16-rounded operands only summation order differs.
    assert float(mx.abs(got - exact).max()) <= 1e-5 * k**0.5 * scale + 1e-6
    # Against fp32 operands: the rounding of x and W.
    assert float(mx.abs(got - plain).max()) <= 2**-6 * scale


SHAPES = [
    (1, 1, 1),
    (1, 384, 384),
    (3, 7, 5),
    (17, 33, 65),  # odd sizes everywhere
    (31, 129, 1),
    (64, 384, 1536),
    (100, 1536, 384),
    (257, 96, 130),  # just past a row bucket
    (1000, 64, 48),
]


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_matmul_on_random_shapes(m: int, k: int, n: int, with_bias: bool) -> None:
    key = mx.random.key(m * 1_000_003 + k * 1009 + n)
    kx, kw, kb = mx.random.split(key, 3)
    x = mx.random.normal((m, k), key=kx)
    w = mx.random.normal((n, k), key=kw) / k**0.5
    b = mx.random.normal((n,), key=kb) if with_bias else None
    check(x, w, b)


def test_leading_dimensions_and_views() -> None:
    x = mx.random.normal((2, 5, 33), key=mx.random.key(1))
    w = mx.random.normal((20, 33), key=mx.random.key(2))
    check(x, w, mx.zeros((20,)))
    # A transposed (non-contiguous) view and a float16 input.
    xt = mx.random.normal((33, 9), key=mx.random.key(3)).T
    check(xt, w, None)
    check(x.astype(mx.float16).astype(mx.float32), w, None)
    assert ext is not None
    half = ext.linear(x.astype(mx.float16), ext.PackedLinear(w, None))
    assert half.dtype == mx.float32 and half.shape == (2, 5, 20)


def test_rows_are_independent_of_the_batch() -> None:
    """A row's result does not depend on which other rows share the matmul."""
    assert ext is not None
    w = mx.random.normal((384, 384), key=mx.random.key(4)) / 20
    packed = ext.PackedLinear(w, mx.ones((384,)))
    x = mx.random.normal((70, 384), key=mx.random.key(5))
    full = np.array(ext.linear(x, packed))
    for rows in (1, 5, 17, 33, 69):
        part = np.array(ext.linear(x[:rows], packed))
        np.testing.assert_allclose(part, full[:rows], rtol=0, atol=1e-5)


def test_layers_of_one_shape_share_their_matmul_plans() -> None:
    """Plans hold generated code (~90 KB each), not data: one per shape, not per layer."""
    assert ext is not None
    x = mx.random.normal((45, 72), key=mx.random.key(9))
    first = ext.PackedLinear(mx.random.normal((40, 72), key=mx.random.key(10)), None)
    mx.eval(ext.linear(x, first))
    planned = ext.plan_count()
    second = ext.PackedLinear(mx.random.normal((40, 72), key=mx.random.key(11)), None)
    a, b = ext.linear(x, first), ext.linear(x, second)
    mx.eval(a, b)
    assert ext.plan_count() == planned
    assert not np.allclose(np.array(a), np.array(b))  # each layer still uses its own weight
    mx.eval(ext.linear(x[:44], second))  # 44 and 45 rows share a row bucket
    assert ext.plan_count() == planned


def test_empty_input_and_wrong_width() -> None:
    assert ext is not None
    packed = ext.PackedLinear(mx.ones((4, 8)), None)
    empty = ext.linear(mx.zeros((0, 8)), packed)
    mx.eval(empty)
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError, match="last dimension must be 8"):
        ext.linear(mx.zeros((3, 7)), packed)
    with pytest.raises(ValueError, match="bias"):
        ext.PackedLinear(mx.ones((4, 8)), mx.ones((3,)))


def test_threads_setting_keeps_results() -> None:
    assert ext is not None
    w = mx.random.normal((256, 512), key=mx.random.key(6))
    x = mx.random.normal((300, 512), key=mx.random.key(7))
    packed = ext.PackedLinear(w, None)
    before = ext.get_threads()
    try:
        ext.set_threads(1)
        one = np.array(ext.linear(x, packed))
        ext.set_threads(2)
        two = np.array(ext.linear(x, packed))
    finally:
        ext.set_threads(before)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-4)


def test_convert_linears_replaces_float_and_quantised_layers() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16, bias=False))
    quantised = nn.Linear(64, 64)
    mx.eval(model.parameters(), quantised.parameters())
    x = mx.random.normal((3, 64), key=mx.random.key(8))
    expected = model(x)
    q_layer = nn.QuantizedLinear.from_linear(quantised, group_size=32, bits=4)
    q_expected = q_layer(x)
    holder = nn.Sequential(q_layer)
    assert cpu_bf16.convert_linears(model) == 2
    assert cpu_bf16.convert_linears(holder) == 1
    assert all(isinstance(m, cpu_bf16.Bf16Linear) for m in model.layers)
    assert cpu_bf16.has_bf16_linears(holder)
    # bf16 weights, padded to oneDNN's blocking, and the fp32 bias.
    unpadded = (64 * 32 + 32 * 16) * 2 + 32 * 4
    assert unpadded <= cpu_bf16.packed_bytes(model) <= 4 * unpadded
    for got, want in ((model(x), expected), (holder(x), q_expected)):
        cos = (got * want).sum(-1) / (mx.linalg.norm(got, axis=-1) * mx.linalg.norm(want, axis=-1))
        assert float(cos.min()) >= 0.9995
