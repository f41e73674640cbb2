"""Rebuild a quantised checkpoint's layers (mlx-lm / mlx-community format) before loading it.

Such a checkpoint stores each quantised matrix as `<path>.weight` (packed uint32),
`<path>.scales` and, for affine quantisation, `<path>.biases`; config.json has a
`quantization` block (bits, group_size, maybe mode and per-layer entries). Bits and group size
are read off each layer's own shapes, so mixed-precision checkpoints load without relying on
the per-layer entries' key names (which follow the converter's module paths, not ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError

# Modes whose scales are uint8 exponents each allow one (bits, group_size) pair.
_SCALED_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}


def quantization_block(config: Mapping[str, Any]) -> dict[str, Any] | None:
    for key in ("quantization", "quantization_config"):
        block = config.get(key)
        if isinstance(block, dict) and "bits" in block:
            return block
    return None


def packed_format(path: str, in_dims: int, weights: Mapping[str, mx.array]) -> dict[str, Any]:
    """`to_quantized` arguments for the packed weight of a layer with `in_dims` inputs."""
    scales = weights[f"{path}.scales"]
    packed = weights[f"{path}.weight"]
    group_size = in_dims // int(scales.shape[-1])
    bits = int(packed.shape[-1]) * 32 // in_dims
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _SCALED_MODES.get((bits, group_size))
    if mode is None:
        raise ModelLoadError(
            f"cannot tell how {path} is quantised ({bits} bits, group size {group_size})"
        )
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantize_like(
    model: nn.Module, weights: Mapping[str, mx.array], config: Mapping[str, Any]
) -> None:
    """Swap in quantised layers wherever the (sanitised) weights have `.scales`."""
    quantized = {key.removesuffix(".scales") for key in weights if key.endswith(".scales")}
    if not quantized:
        return
    if quantization_block(config) is None:
        raise ModelLoadError(
            "the weights are quantised (they have .scales) but config.json has no "
            "`quantization` block; the checkpoint is incomplete"
        )

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path not in quantized or not hasattr(module, "to_quantized"):
            return False
        in_dims = int(module.weight.shape[-1])
        return packed_format(path, in_dims, weights)

    nn.quantize(model, class_predicate=predicate)


def quantized_bits(module: nn.Module) -> set[int]:
    return {
        int(m.bits)
        for _, m in module.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def bits_label(bits: set[int]) -> str:
    """ "q4", or "q4+q8" for mixed precision."""
    return "+".join(f"q{b}" for b in sorted(bits))
