"""The bf16 extension's lifetimes and threads (ext/bf16): what a hang or a crash would need.

A layer's packed weight is reached from MLX's graph and from MLX's CPU stream thread, which
runs without the GIL. The weight must outlive the Python object that made it, and dropping
the last reference on the stream thread must never need the GIL (the Python thread holds it
while it waits for the eval): such a deadlock hangs the whole process, so the stress runs in
a child process with a deadline.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from akidb_embed.modeling import cpu_bf16

STRESS = textwrap.dedent(
    """
    import gc
    import mlx.core as mx
    import numpy as np
    from akidb_embed.modeling import cpu_bf16

    ext = cpu_bf16.extension()
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((48, 32), np.float32))
    b = mx.array(rng.standard_normal(48, np.float32))
    r = lambda a: a.astype(mx.bfloat16).astype(mx.float32)
    bad = 0
    for i in range(1500):
        x = mx.array(rng.standard_normal((int(rng.integers(1, 40)), 32), np.float32))
        # The Python handle dies before the graph is evaluated: the graph (then the stream
        # thread) holds the only references to the packed weight.
        y = ext.linear(x, ext.PackedLinear(w, b))
        z = ext.linear(mx.tanh(y), ext.PackedLinear(mx.transpose(w), None))
        if i % 3 == 0:
            mx.async_eval(z)  # the stream thread runs while this thread drops the graph
        if i % 50 == 0:
            gc.collect()
        want = r(mx.tanh(r(x) @ r(w).T + b)) @ r(w)
        got = np.asarray(z) if i % 2 else (mx.eval(z), np.asarray(z))[1]
        if np.abs(got - np.asarray(want)).max() > 5e-2:
            bad += 1
        del x, y, z
    print("wrong results:", bad)
    raise SystemExit(1 if bad else 0)
    """
)


@pytest.mark.skipif(not cpu_bf16.runnable(), reason=cpu_bf16.unavailable_reason())
def test_dropped_handles_and_threads_neither_hang_nor_corrupt() -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", STRESS], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the bf16 stress hung (deadlock): {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_a_bf16_kernel_packing_says_why() -> None:
    ext = cpu_bf16.extension()
    if ext is None or ext.bf16_runnable():
        pytest.skip("needs the extension on a CPU where oneDNN has no bf16 matmul")
    import mlx.core as mx

    with pytest.raises(RuntimeError, match="no bf16 matmul for this CPU"):
        ext.PackedLinear(mx.zeros((4, 4)), None)
    assert "no bf16 matmul" in cpu_bf16.unavailable_reason()
