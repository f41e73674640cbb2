"""Which precision a loaded model computes in, by device, and the conversions that get it there.

MLX on a CPU has no fast path for 4-bit `quantized_matmul` (about 70x slower than an fp32
matmul with OpenBLAS here) nor for float16/bfloat16 matmuls (about 30x slower), so on the CPU
quantised linear layers are dequantised to float32 and half-precision weights are cast to
float32 at load. On Metal and CUDA both run fast as stored and stay so. Either choice can be
forced with `--dequantize` / `--upcast` (AKIDB_EMBED_DEQUANTIZE / AKIDB_EMBED_UPCAST) =
auto | always | never.

Past fp32 on the CPU: where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)
and the compiled extension is present (cpu_bf16.py), linear layers compute in bf16 through
oneDNN; everything else (norms, attention scores, softmax, pooling) stays fp32. The choice is
`--cpu-precision` / AKIDB_EMBED_CPU_PRECISION = auto | fp32 | bf16, one setting per server
(ModelPrecision, carried to each engine worker with the model it loads). bf16 vectors are a
different space from fp32 ones, so the model's dtype label, and with it the fingerprint, says
which ran.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import ModelLoadError
from . import cpu_bf16
from .quantization import bits_label, quantized_bits

DEQUANTIZE_ENV = "AKIDB_EMBED_DEQUANTIZE"
UPCAST_ENV = "AKIDB_EMBED_UPCAST"
CPU_PRECISION_ENV = "AKIDB_EMBED_CPU_PRECISION"
# CPU flags (/proc/cpuinfo) whose bf16 instructions the extension's kernels use.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

log = logging.getLogger(__name__)
_HALF = (mx.float16, mx.bfloat16)


class Choice(str, Enum):
    AUTO = "auto"  # only on the CPU
    ALWAYS = "always"
    NEVER = "never"

    def applies(self, on_cpu: bool) -> bool:
        return self is Choice.ALWAYS or (self is Choice.AUTO and on_cpu)


@dataclass(frozen=True)
class PrecisionPolicy:
    # Quantised linear layers -> float32 (embedding tables stay quantised: a lookup is cheap).
    dequantize: Choice = Choice.AUTO
    # float16 / bfloat16 weights -> float32.
    upcast: Choice = Choice.AUTO

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PrecisionPolicy:
        env = os.environ if environ is None else environ
        return cls(
            dequantize=_choice(env, DEQUANTIZE_ENV),
            upcast=_choice(env, UPCAST_ENV),
        )


def _choice(env: Mapping[str, str], name: str) -> Choice:
    value = env.get(name, Choice.AUTO.value).strip().lower()
    try:
        return Choice(value)
    except ValueError:
        allowed = ", ".join(c.value for c in Choice)
        raise ModelLoadError(f"{name}={value!r} is not valid; use one of {allowed}") from None


class CpuPrecision(str, Enum):
    AUTO = "auto"  # bf16 where the CPU and the extension allow it, else fp32
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 linear layers; fails to load where the extension is missing


def cpu_precision_choice(environ: Mapping[str, str] | None = None) -> CpuPrecision:
    env = os.environ if environ is None else environ
    value = env.get(CPU_PRECISION_ENV, CpuPrecision.AUTO.value).strip().lower()
    try:
        return CpuPrecision(value)
    except ValueError:
        allowed = ", ".join(c.value for c in CpuPrecision)
        raise ModelLoadError(
            f"{CPU_PRECISION_ENV}={value!r} is not valid; use one of {allowed}"
        ) from None


@dataclass(frozen=True)
class ModelPrecision:
    """Every precision setting of a server (config.py), handed to each process that loads."""

    cpu: CpuPrecision = CpuPrecision.AUTO
    dequantize: Choice = Choice.AUTO
    upcast: Choice = Choice.AUTO

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModelPrecision:
        policy = PrecisionPolicy.from_env(environ)
        return cls(cpu_precision_choice(environ), policy.dequantize, policy.upcast)

    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy(self.dequantize, self.upcast)


@dataclass(frozen=True)
class CpuPath:
    """What the CPU engine's linear layers compute in, and why."""

    bf16: bool
    reason: str

    @property
    def label(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        """e.g. "bf16 linears (onednn 2.6.3 avx512_core_bf16)" or "fp32 (...)"."""
        return f"bf16 linears ({self.reason})" if self.bf16 else f"fp32 ({self.reason})"


def resolve_cpu_path(
    environ: Mapping[str, str] | None = None, flags: set[str] | None = None
) -> CpuPath:
    """Decide fp32 or bf16 for this process's CPU engine. Raises ModelLoadError when bf16
    is forced and cannot run."""
    from ..host.blas import cpu_flags

    choice = cpu_precision_choice(environ)
    if choice is CpuPrecision.FP32:
        return CpuPath(False, f"{CPU_PRECISION_ENV}=fp32")
    flags = cpu_flags() if flags is None else flags
    cpu_bf16_flags = sorted(BF16_CPU_FLAGS & flags)
    ext = cpu_bf16.extension()
    if choice is CpuPrecision.BF16:
        if not cpu_bf16.runnable():
            raise ModelLoadError(
                f"{CPU_PRECISION_ENV}=bf16, but {cpu_bf16.unavailable_reason()}; "
                "use --cpu-precision auto or fp32"
            )
        note = "" if cpu_bf16_flags else "; this CPU has no bf16 instructions: slow"
        return CpuPath(True, cpu_bf16.describe() + note)
    if not cpu_bf16_flags:
        return CpuPath(False, "the CPU has no avx512_bf16 or amx_bf16")
    if ext is None:
        return CpuPath(False, str(cpu_bf16.load_error()))
    if not ext.bf16_supported():
        return CpuPath(False, f"oneDNN sees no bf16 kernels for this CPU ({ext.isa()})")
    return CpuPath(True, cpu_bf16.describe())


_logged: set[CpuPath] = set()


def log_cpu_path(path: CpuPath) -> None:
    """Log the CPU path once per process."""
    if path not in _logged:
        _logged.add(path)
        log.info("CPU precision: %s", path.describe())


def dequantize_linears(module: nn.Module) -> None:
    """Replace every QuantizedLinear with a float32 Linear holding the same values."""
    replacements = []
    for path, layer in module.named_modules():
        if not isinstance(layer, nn.QuantizedLinear):
            continue
        scales, biases = layer.scales, layer.get("biases")
        if scales.dtype in _HALF:  # dequantise in float32, not in the scales' half precision
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        weight = mx.dequantize(
            layer.weight, scales, biases, layer.group_size, layer.bits, mode=layer.mode
        ).astype(mx.float32)
        linear = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias="bias" in layer)
        linear.weight = weight
        if "bias" in layer:
            linear.bias = layer.bias
        replacements.append((path, linear))
    if replacements:
        module.update_modules(tree_unflatten(replacements))


def upcast(module: nn.Module, *, keep_embedding_tables: bool) -> None:
    """Cast float16/bfloat16 arrays to float32 (quantised layers: their scales and biases)."""
    for _, layer in module.named_modules():
        if keep_embedding_tables and isinstance(layer, nn.Embedding):
            continue
        for key, value in list(layer.items()):
            if isinstance(value, mx.array) and value.dtype in _HALF:
                layer[key] = value.astype(mx.float32)


def float_label(module: nn.Module) -> str:
    """The dtype of the largest floating-point matrix outside embedding tables."""
    best: tuple[int, str] = (-1, "float32")
    for _, layer in module.named_modules():
        if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
            continue
        for value in layer.values():
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
                best = max(best, (value.size, str(value.dtype).removeprefix("mlx.core.")))
    return best[1]


def stored_label(module: nn.Module) -> str:
    """What a freshly loaded model holds: "q4", "q4+q8", "bfloat16", "float32"..."""
    bits = quantized_bits(module)
    return bits_label(bits) if bits else float_label(module)


def computed_label(module: nn.Module) -> str:
    """What the matrix multiplications run in."""
    if cpu_bf16.has_bf16_linears(module):
        return "bfloat16"
    bits = {
        int(layer.bits)
        for _, layer in module.named_modules()
        if isinstance(layer, nn.QuantizedLinear)
    }
    return bits_label(bits) if bits else float_label(module)


def apply_precision(
    module: nn.Module,
    policy: PrecisionPolicy,
    *,
    on_cpu: bool,
    keep_embedding_tables: bool = False,
    cpu_path: CpuPath | None = None,
) -> str:
    """Convert `module` in place; returns e.g. "q4->float32" (stored->computed) or "float32".

    With `cpu_path.bf16` (CPU only) linear layers become bf16 ones first, from whatever they
    store, before the rest is dequantised or upcast: "float32->bfloat16", "q4->bfloat16".
    """
    stored = stored_label(module)
    if on_cpu and cpu_path is not None and cpu_path.bf16:
        cpu_bf16.convert_linears(module)
    if policy.dequantize.applies(on_cpu):
        dequantize_linears(module)
    if policy.upcast.applies(on_cpu):
        upcast(module, keep_embedding_tables=keep_embedding_tables)
    computed = computed_label(module)
    return stored if stored == computed else f"{stored}->{computed}"
