"""Build an EmbeddingEngine from a model directory: config, safetensors, tokenizer and the
sentence-transformers pipeline files (modules.json, pooling, Dense, prompts)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer

from ..errors import ModelLoadError
from ..host.blas import openblas_threads
from ..host.device import on_gpu
from . import cpu_bf16
from .engine import Compute, EmbeddingEngine, ModelProfile, Network, NetworkFacts
from .models import architecture_module
from .models.base import Pooling
from .precision import (
    CPU_PRECISION_ENV,
    CpuPrecision,
    PrecisionPolicy,
    apply_precision,
    dequantize_linears,
    log_cpu_path,
    resolve_cpu_path,
)
from .quantization import quantize_like
from .tokenization import TextTokenizer

log = logging.getLogger(__name__)

# Weights in these formats are pickles (code on load): never loaded, named in errors.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, list) else []


@dataclass(frozen=True)
class Pipeline:
    """The sentence-transformers module list, or the architecture's defaults without one."""

    pooling: Pooling
    normalize: bool
    dense_dirs: tuple[Path, ...]
    max_tokens: int | None


_POOLING_KEYS = {
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_lasttoken": Pooling.LAST_TOKEN,
}
_POOLING_NAMES = {"mean": Pooling.MEAN, "cls": Pooling.CLS, "lasttoken": Pooling.LAST_TOKEN}


def read_pooling(path: Path) -> Pooling:
    config = read_json(path / "config.json")
    mode = config.get("pooling_mode")
    if isinstance(mode, str) and mode in _POOLING_NAMES:
        return _POOLING_NAMES[mode]
    for key, pooling in _POOLING_KEYS.items():
        if config.get(key):
            return pooling
    raise ModelLoadError(
        f"{path}/config.json asks for a pooling mode akidb-embed does not support; "
        "supported: mean, cls, lasttoken"
    )


def read_pipeline(model_dir: Path, arch: ModuleType) -> Pipeline:
    pooling: Pooling = getattr(arch, "DEFAULT_POOLING", Pooling.MEAN)
    normalize = bool(getattr(arch, "DEFAULT_NORMALIZE", True))
    dense: list[Path] = []
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        normalize = False
        for module in read_json_list(modules_file):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = model_dir / str(module.get("path", ""))
            if kind == "Pooling":
                pooling = read_pooling(path)
            elif kind == "Dense":
                dense.append(path)
            elif kind == "Normalize":
                normalize = True
    max_tokens = None
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        value = read_json(st_config).get("max_seq_length")
        max_tokens = int(value) if value else None
    return Pipeline(pooling, normalize, tuple(dense), max_tokens)


def read_prompts(model_dir: Path, arch: ModuleType) -> dict[str, str]:
    """The checkpoint's prompts; the architecture's defaults if it ships none."""
    path = model_dir / "config_sentence_transformers.json"
    own = (read_json(path).get("prompts") or {}) if path.exists() else {}
    prompts = own or getattr(arch, "DEFAULT_PROMPTS", {})
    return {str(k): str(v) for k, v in prompts.items()}


def load_safetensors(directory: Path) -> dict[str, mx.array]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES]
        hint = (
            f"it has only pickled weights ({', '.join(pickled)}), which akidb-embed never loads"
            if pickled
            else "it has no weights"
        )
        raise ModelLoadError(
            f"no *.safetensors in {directory}: {hint}; use a repository with safetensors weights"
        )
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            loaded = mx.load(str(file))
        except Exception as exc:  # mlx raises RuntimeError/ValueError on a damaged file
            raise ModelLoadError(
                f"cannot read weights {file}: {exc}; the file is damaged: "
                "delete the model and pull it again"
            ) from exc
        assert isinstance(loaded, dict)
        weights.update(loaded)
    return weights


class DenseHead(nn.Module):
    """A sentence-transformers Dense module (Linear + activation), always in float32."""

    ACTIVATIONS = ("Identity", "Tanh", "")

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.tanh = activation == "Tanh"

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x.astype(mx.float32))
        return mx.tanh(y) if self.tanh else y


# mlx-embeddings folds sentence-transformers Dense modules into the main checkpoint as
# `dense.<i>.*` (mlx-community EmbeddingGemma), maybe quantised, instead of <n>_Dense/ files.
FOLDED_DENSE_PREFIX = "dense."


def split_folded_dense(weights: dict[str, mx.array]) -> list[dict[str, mx.array]]:
    """Pop `dense.<i>.<param>` keys out of `weights`: one {param: array} per Dense, in order."""
    folded: dict[int, dict[str, mx.array]] = {}
    for key in [k for k in weights if k.startswith(FOLDED_DENSE_PREFIX)]:
        index, _, param = key.removeprefix(FOLDED_DENSE_PREFIX).partition(".")
        if not index.isdigit():
            continue
        folded.setdefault(int(index), {})[param] = weights.pop(key)
    return [folded[i] for i in sorted(folded)]


def dense_head(
    path: Path | None,
    folded: dict[str, mx.array] | None,
    config: dict[str, Any],
    in_features: int,
) -> DenseHead:
    """A Dense module from its directory, or from weights folded into the main checkpoint.

    `in_features` (the previous stage's width) is used when there is no Dense config.json.
    """
    st_config = read_json(path / "config.json") if path and (path / "config.json").exists() else {}
    activation = str(st_config.get("activation_function", "")).rsplit(".", 1)[-1]
    if activation not in DenseHead.ACTIVATIONS:
        raise ModelLoadError(f"Dense activation {activation!r} in {path} is not supported")
    if path is not None and any(path.glob("*.safetensors")):
        weights = {k.removeprefix("linear."): v for k, v in load_safetensors(path).items()}
    elif folded:
        weights = folded
    else:
        raise ModelLoadError(f"the Dense module {path} has no weights")
    head = DenseHead(
        int(st_config.get("in_features", in_features)),
        int(weights["weight"].shape[0]),
        bias="bias" in weights,
        activation=activation,
    )
    prefixed = {f"linear.{k}": v for k, v in weights.items()}
    quantize_like(head, prefixed, config)
    try:
        head.load_weights(list(prefixed.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"Dense weights ({path or 'dense.*'}) do not fit: {exc}") from exc
    # Small next to the network: float32 everywhere keeps the pooled vector's precision.
    dequantize_linears(head)
    head.set_dtype(mx.float32)
    return head


def parameter_bytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    arrays = sum(v.nbytes for _, v in tree_flatten(module.parameters()))
    return arrays + cpu_bf16.packed_bytes(module)


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory says without loading its weights: the front's half."""

    directory: Path
    config: dict[str, Any]
    model_type: str
    arch: ModuleType
    pipeline: Pipeline
    max_tokens: int
    tokenizer: TextTokenizer
    pad_id: int


def read_model_files(model_dir: Path) -> ModelFiles:
    """config.json, the sentence-transformers pipeline and the tokenizer; no weights."""
    if not (model_dir / "config.json").exists():
        raise ModelLoadError(f"{model_dir} has no config.json; it is not a model directory")
    config = read_json(model_dir / "config.json")
    model_type = str(config.get("model_type", ""))
    arch = architecture_module(model_type)
    pipeline = read_pipeline(model_dir, arch)
    positions = int(config.get("max_position_embeddings") or 512)
    max_tokens = pipeline.max_tokens or positions
    if max_tokens > positions:
        # Past its position table a model reads garbage; sentence-transformers stops there.
        log.warning(
            "%s: max_seq_length %d is more than the model's %d positions; using %d",
            model_dir,
            max_tokens,
            positions,
            positions,
        )
        max_tokens = positions
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json")
    try:
        raw_tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from exc
    prepare_tokenizer = getattr(arch, "prepare_tokenizer", None)
    if prepare_tokenizer is not None:
        prepare_tokenizer(raw_tokenizer)
    pad_id = config.get("pad_token_id")
    return ModelFiles(
        directory=model_dir,
        config=config,
        model_type=model_type,
        arch=arch,
        pipeline=pipeline,
        max_tokens=max_tokens,
        tokenizer=TextTokenizer(raw_tokenizer, max_tokens),
        pad_id=int(pad_id) if isinstance(pad_id, int) else 0,
    )


def load_network(
    files: ModelFiles,
    precision: PrecisionPolicy | None = None,
    cpu_precision: CpuPrecision | None = None,
) -> tuple[Network, str, int]:
    """The back half: the network and its heads, precision applied. Returns it, its dtype
    label and its output width."""
    model_dir, config, arch, model_type = (
        files.directory,
        files.config,
        files.arch,
        files.model_type,
    )
    try:
        args = arch.ModelArgs.from_dict(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{model_dir}/config.json does not describe a {model_type} model: {exc}"
        ) from exc
    try:
        model = arch.Model(args)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # A value of the wrong type (e.g. `"head_dim": null`) passes ModelArgs but not the
        # network's construction.
        raise ModelLoadError(
            f"{model_dir}/config.json does not describe a {model_type} model: {exc}"
        ) from exc
    raw_weights = load_safetensors(model_dir)
    folded_dense = split_folded_dense(raw_weights)
    weights = arch.sanitize(raw_weights)
    quantize_like(model, weights, config)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(
            f"weights in {model_dir} do not fit a {model_type} model: {exc}"
        ) from exc
    del raw_weights, weights
    on_cpu = not on_gpu()
    cpu_path = None
    if on_cpu:
        env = None if cpu_precision is None else {CPU_PRECISION_ENV: cpu_precision.value}
        cpu_path = resolve_cpu_path(env)
        log_cpu_path(cpu_path)
        if cpu_path.bf16:
            # As many matmul threads as this process gives OpenBLAS (1 in engine workers).
            cpu_bf16.set_threads(openblas_threads() or 1)
    dtype = apply_precision(
        model,
        precision or PrecisionPolicy.from_env(),
        on_cpu=on_cpu,
        keep_embedding_tables=bool(getattr(arch, "CASTS_EMBEDDING_LOOKUPS", False)),
        cpu_path=cpu_path,
    )
    model.eval()
    mx.eval(model.parameters())

    heads: list[DenseHead] = []
    dimensions = int(config["hidden_size"])
    dense_dirs = files.pipeline.dense_dirs
    for index in range(max(len(dense_dirs), len(folded_dense))):
        path = dense_dirs[index] if index < len(dense_dirs) else None
        folded = folded_dense[index] if index < len(folded_dense) else None
        heads.append(dense_head(path, folded, config, dimensions))
        dimensions = int(heads[-1].linear.weight.shape[0])
    mx.eval([head.parameters() for head in heads])
    network = Network(
        model,
        files.pipeline.pooling,
        heads,
        pad_id=files.pad_id,
        memory_bytes=parameter_bytes(model) + sum(parameter_bytes(h) for h in heads),
    )
    return network, dtype, dimensions


def model_profile(files: ModelFiles, dtype: str, dimensions: int) -> ModelProfile:
    arch = files.arch
    min_dimensions = getattr(arch, "MIN_DIMENSIONS", None)
    return ModelProfile(
        architecture=files.model_type,
        dimensions=dimensions,
        max_tokens=files.max_tokens,
        pooling=files.pipeline.pooling,
        normalize=files.pipeline.normalize,
        dtype=dtype,
        prompts=read_prompts(files.directory, arch),
        matryoshka_dimensions=tuple(
            d for d in getattr(arch, "MATRYOSHKA_DIMENSIONS", ()) if d < dimensions
        ),
        min_dimensions=min_dimensions if min_dimensions and min_dimensions < dimensions else None,
        instruction_template=getattr(arch, "INSTRUCTION_TEMPLATE", None),
    )


def load_engine(
    model_dir: Path,
    *,
    name: str,
    source: str,
    revision: str,
    precision: PrecisionPolicy | None = None,
    cpu_precision: CpuPrecision | None = None,
) -> EmbeddingEngine:
    """Load a model directory, both halves. Raises ModelLoadError with a message a person
    can act on.

    `precision` defaults to the AKIDB_EMBED_DEQUANTIZE / AKIDB_EMBED_UPCAST environment,
    `cpu_precision` to AKIDB_EMBED_CPU_PRECISION (precision.py).
    """
    files = read_model_files(model_dir)
    network, dtype, dimensions = load_network(files, precision, cpu_precision)
    return EmbeddingEngine(
        name=name,
        source=source,
        revision=revision,
        profile=model_profile(files, dtype, dimensions),
        tokenizer=files.tokenizer,
        network=network,
    )


def load_front(
    model_dir: Path,
    *,
    name: str,
    source: str,
    revision: str,
    facts: NetworkFacts,
    compute: Compute,
) -> EmbeddingEngine:
    """The front half alone, for a network loaded elsewhere (engine workers): `facts` are
    what loading it decided, `compute` runs a batch on it. Reads no weights."""
    files = read_model_files(model_dir)
    return EmbeddingEngine(
        name=name,
        source=source,
        revision=revision,
        profile=model_profile(files, facts.dtype, facts.dimensions),
        tokenizer=files.tokenizer,
        compute=compute,
        memory_bytes=facts.memory_bytes,
    )
