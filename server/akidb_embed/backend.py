"""Which compute backend MLX runs on, for Health and the logs."""

from __future__ import annotations

import mlx.core as mx


def describe_backend() -> str:
    if mx.metal.is_available():
        return "gpu (metal)"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "gpu (cuda)"
    return f"cpu ({blas_name()})"


def blas_name() -> str:
    """The BLAS library mapped into this process (MLX's CPU matmuls go through it)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "unknown blas"
    # numpy's wheel maps its own OpenBLAS too: look for the one MLX resolves `libblas` to.
    if "openblas-pthread/libblas.so" in text or "openblas-openmp/libblas.so" in text:
        return "openblas"
    return "reference blas: install libopenblas0-pthread for ~50x faster matmuls"
