"""bf16 linear layers for MLX's CPU backend, through the compiled `_bf16` extension.

MLX's CPU matmuls run in fp32 (cblas_sgemm); its own bf16 matmul has no fast path. The
extension (ext/bf16, built by `make setup` with scripts/build-native.sh) adds an MLX
primitive that runs oneDNN's bf16 matmul, with AVX512-BF16 or AMX kernels, on a weight packed
once at load; activations stay fp32 between layers and are rounded to bf16 on the fly.
Which layers use it is decided in precision.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

BUILD_HINT = "run `make native` (needs cmake, a C++ compiler and libdnnl-dev)"

_module: ModuleType | None = None
_error: str | None = None


def extension() -> ModuleType | None:
    """The compiled extension, or None (see `load_error()` for why)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            module = importlib.import_module("akidb_embed.modeling._bf16")
        except ImportError as exc:
            _error = (
                f"the bf16 extension is not built ({BUILD_HINT})"
                if "_bf16" in str(exc) and "No module" in str(exc)
                else f"the bf16 extension does not load: {exc}"
            )
            return None
        built_for, running = str(module.mlx_version()), str(getattr(mx, "__version__", ""))
        if built_for != running:
            _error = (
                f"the bf16 extension was built for mlx {built_for}, this is mlx "
                f"{running}: rebuild it with `make native`"
            )
        else:
            _module = module
    return _module


def load_error() -> str | None:
    extension()
    return _error


def runnable() -> bool:
    """Whether bf16 layers can run here: the extension loads and oneDNN has a bf16 matmul
    for this CPU (native, or emulated on AVX512 without bf16; none on AVX2 alone)."""
    ext = extension()
    return ext is not None and bool(ext.bf16_runnable())


def unavailable_reason() -> str:
    """Why `runnable()` is False; "" when it is True."""
    ext = extension()
    if ext is None:
        return str(load_error())
    if not ext.bf16_runnable():
        return f"oneDNN has no bf16 matmul for this CPU (its ISA: {ext.isa()})"
    return ""


def describe() -> str:
    """e.g. "onednn 2.6.3 avx512_core_bf16"; "" without the extension."""
    ext = extension()
    return "" if ext is None else f"onednn {ext.onednn_version()} {ext.isa()}"


class Bf16Linear(nn.Module):
    """y = x @ W.T + b with W in bf16 (packed for oneDNN); fp32 in, fp32 out. CPU only."""

    def __init__(self, packed: Any) -> None:
        super().__init__()
        self.packed = packed  # not an mx.array: MLX's tree utilities leave it alone

    @classmethod
    def from_weights(cls, weight: mx.array, bias: mx.array | None) -> Bf16Linear:
        ext = extension()
        if ext is None:
            raise RuntimeError(load_error() or "the bf16 extension is unavailable")
        return cls(ext.PackedLinear(weight, bias))

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes)

    def _extra_repr(self) -> str:
        p = self.packed
        return f"input_dims={p.in_features}, output_dims={p.out_features}, bias={p.has_bias}"

    def __call__(self, x: mx.array) -> mx.array:
        ext = extension()
        assert ext is not None
        return ext.linear(x, self.packed)


def set_threads(threads: int) -> None:
    ext = extension()
    if ext is not None:
        ext.set_threads(int(threads))


def float_weight(layer: nn.Module) -> mx.array:
    """A Linear or QuantizedLinear layer's weight as float32 (out, in)."""
    if isinstance(layer, nn.QuantizedLinear):
        scales, biases = layer.scales, layer.get("biases")
        scales = scales.astype(mx.float32) if scales.dtype != mx.uint8 else scales
        biases = None if biases is None else biases.astype(mx.float32)
        return mx.dequantize(
            layer.weight, scales, biases, layer.group_size, layer.bits, mode=layer.mode
        ).astype(mx.float32)
    return layer.weight.astype(mx.float32)


def convert_linears(module: nn.Module) -> int:
    """Replace every Linear and QuantizedLinear in `module` with a Bf16Linear; returns how
    many. Layers are converted one at a time, so at most one fp32 copy exists at once."""
    replacements = []
    for path, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            continue
        weight = float_weight(layer)
        bias = layer.bias.astype(mx.float32) if "bias" in layer else None
        replacements.append((path, Bf16Linear.from_weights(weight, bias)))
        del weight
    if replacements:
        module.update_modules(tree_unflatten(replacements))
    return len(replacements)


def packed_bytes(module: nn.Module) -> int:
    return sum(m.nbytes for _, m in module.named_modules() if isinstance(m, Bf16Linear))


def has_bf16_linears(module: nn.Module) -> bool:
    return any(isinstance(m, Bf16Linear) for _, m in module.named_modules())
