"""`python -m bench.bf16_gemm`: GFLOP/s of each CPU matmul route on this machine.

Routes, y = x @ W.T on all-MiniLM-L6-v2 and Qwen3-0.6B shapes, rows = tokens in a batch:
- MLX fp32 `x @ w.T` (the BLAS MLX resolves: OpenBLAS when preloaded);
- MLX bf16 `x @ w.T` in MLX's own CPU kernels;
- the bf16 extension (oneDNN bf16 matmul, fp32 in and out, conversion included);
- oneMKL's `cblas_gemm_bf16bf16f32` through ctypes, where `libmkl_rt.so.3` (PyPI `mkl`) is
  next to this Python (bf16 operands prepared outside the timing).
Each rate includes the per-call overhead; rel err = max |y - y64| / max |y64|.
Run it with the BLAS preloaded: `python -m akidb_embed.host.blas python -m bench.bf16_gemm`.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from akidb_embed.modeling import cpu_bf16
from akidb_embed.runtime.backend import blas_name

SHAPES = [(512, 384, 384), (512, 384, 1536), (512, 1536, 384), (32, 1024, 3072), (1024,) * 3]


def rate(fn: Callable[[], object], flops: float, seconds: float = 0.4) -> float:
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return flops * calls / (time.perf_counter() - started) / 1e9


def mkl_library() -> ctypes.CDLL | None:
    path = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.MKL_Set_Threading_Layer(1)  # sequential: one thread, like an engine worker
    return lib


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def evaluated(y: mx.array) -> mx.array:
    mx.eval(y)
    return y


def as_numpy(y: mx.array | np.ndarray) -> np.ndarray:
    return y if isinstance(y, np.ndarray) else np.array(y.astype(mx.float32))


def routes_for(
    m: int, k: int, n: int, ext: Any, mkl: ctypes.CDLL | None
) -> tuple[np.ndarray, dict[str, Callable[[], mx.array | np.ndarray]]]:
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((m, k), dtype=np.float32)
    wa = rng.standard_normal((n, k), dtype=np.float32)
    exact = xa.astype(np.float64) @ wa.T.astype(np.float64)
    x, w = mx.array(xa), mx.array(wa)
    xb, wb = x.astype(mx.bfloat16), w.astype(mx.bfloat16)
    routes: dict[str, Callable[[], mx.array | np.ndarray]] = {
        "mlx fp32": lambda: evaluated(x @ w.T),
        "mlx bf16 (own kernels)": lambda: evaluated(xb @ wb.T),
    }
    if ext is not None:
        packed = ext.PackedLinear(w, None)
        routes["extension bf16 (onednn)"] = lambda: evaluated(ext.linear(x, packed))
    if mkl is not None:
        ab, bb, c = to_bf16_bits(xa), to_bf16_bits(wa), np.zeros((m, n), np.float32)
        p = ctypes.c_void_p
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

        def mkl_bf16() -> np.ndarray:
            # Row-major, no transpose of x, transpose of W.
            mkl.cblas_gemm_bf16bf16f32(
                101, 111, 112, m, n, k, one, ab.ctypes.data_as(p), k,
                bb.ctypes.data_as(p), k, zero, c.ctypes.data_as(p), n,
            )  # fmt: skip
            return c

        routes["mkl cblas_gemm_bf16bf16f32"] = mkl_bf16
    return exact, routes


def main() -> None:
    ext = cpu_bf16.extension()
    mkl = mkl_library()
    print(f"BLAS: {blas_name()}; extension: {cpu_bf16.describe() or cpu_bf16.load_error()}")
    print(f"{'M x K x N':>18s} {'route':28s} {'GFLOP/s':>8s} {'rel err':>8s}")
    for m, k, n in SHAPES:
        exact, routes = routes_for(m, k, n, ext, mkl)
        for name, fn in routes.items():
            err = float(np.abs(as_numpy(fn()) - exact).max() / np.abs(exact).max())
            print(f"{f'{m}x{k}x{n}':>18s} {name:28s} {rate(fn, 2.0 * m * k * n):8.0f} {err:8.1e}")


if __name__ == "__main__":
    main()
