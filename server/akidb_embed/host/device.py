"""Where MLX computes: the one place that asks whether there is a GPU."""

from __future__ import annotations

import mlx.core as mx


def gpu_backend() -> str | None:
    """ "metal" or "cuda" when MLX has a GPU here, else None (the CPU backend)."""
    if mx.metal.is_available():
        return "metal"
    if mx.is_available(mx.gpu):
        return "cuda"
    return None


def on_gpu() -> bool:
    """Whether this process's MLX work runs on a GPU (its default device)."""
    return bool(mx.default_device().type == mx.DeviceType.gpu)


def device_kind() -> str:
    return "gpu" if on_gpu() else "cpu"
