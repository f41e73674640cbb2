"""Which compute backend MLX runs on, for Health and the logs."""

from __future__ import annotations

from .blas import describe_cpu_blas
from .device import gpu_backend


def describe_backend() -> str:
    gpu = gpu_backend()
    if gpu is not None:
        return f"gpu ({gpu})"
    return f"cpu ({blas_name()}; {cpu_precision()})"


def blas_name() -> str:
    """The BLAS MLX's CPU matmuls go through, and its kernels (see blas.py)."""
    return describe_cpu_blas()


def cpu_precision() -> str:
    """What the CPU engine's linear layers compute in (precision.py), e.g. "fp32 (...)"."""
    from .errors import ModelLoadError
    from .precision import resolve_cpu_path

    try:
        return resolve_cpu_path().describe()
    except ModelLoadError as exc:
        return f"unavailable: {exc}"
