"""Which compute backend MLX runs on, for Health and the logs."""

from __future__ import annotations

from ..errors import ModelLoadError
from ..host.blas import describe_cpu_blas
from ..host.device import gpu_backend
from ..modeling.precision import CPU_PRECISION_ENV, CpuPrecision, resolve_cpu_path


def describe_backend(choice: CpuPrecision | None = None) -> str:
    """e.g. "cpu (openblas Haswell; fp32 (...))"; `choice` is the server's CPU precision
    (default: the environment's)."""
    gpu = gpu_backend()
    if gpu is not None:
        return f"gpu ({gpu})"
    return f"cpu ({blas_name()}; {cpu_precision(choice)})"


def blas_name() -> str:
    """The BLAS MLX's CPU matmuls go through, and its kernels (see blas.py)."""
    return describe_cpu_blas()


def cpu_precision(choice: CpuPrecision | None = None) -> str:
    """What the CPU engine's linear layers compute in (precision.py), e.g. "fp32 (...)"."""
    env = None if choice is None else {CPU_PRECISION_ENV: choice.value}
    try:
        return resolve_cpu_path(env).describe()
    except ModelLoadError as exc:
        return f"unavailable: {exc}"
