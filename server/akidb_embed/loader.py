"""Build an EmbeddingEngine from a model directory: config, safetensors, tokenizer and the
sentence-transformers pipeline files (modules.json, pooling, Dense, prompts)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .engine import EmbeddingEngine, Head, ModelProfile
from .errors import ModelLoadError
from .models import architecture_module
from .models.base import Pooling
from .tokenization import TextTokenizer

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


def read_prompts(model_dir: Path) -> dict[str, str]:
    path = model_dir / "config_sentence_transformers.json"
    if not path.exists():
        return {}
    prompts = read_json(path).get("prompts") or {}
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


def identity(x: mx.array) -> mx.array:
    return x


def dense_head(path: Path) -> Head:
    """A sentence-transformers Dense module (Linear + activation)."""
    config = read_json(path / "config.json")
    activation = str(config.get("activation_function", "")).rsplit(".", 1)[-1]
    activations: dict[str, Callable[[mx.array], mx.array]] = {
        "Identity": identity,
        "": identity,
        "Tanh": mx.tanh,
    }
    if activation not in activations:
        raise ModelLoadError(f"Dense activation {activation!r} in {path} is not supported")
    layer = nn.Linear(
        int(config["in_features"]), int(config["out_features"]), bias=config.get("bias", True)
    )
    weights = {k.removeprefix("linear."): v for k, v in load_safetensors(path).items()}
    layer.load_weights(list(weights.items()))
    layer.set_dtype(mx.float32)
    act = activations[activation]
    return lambda x: act(layer(x.astype(mx.float32)))


def parameter_bytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def load_engine(model_dir: Path, *, name: str, source: str, revision: str) -> EmbeddingEngine:
    """Load a model directory. Raises ModelLoadError with a message a person can act on."""
    if not (model_dir / "config.json").exists():
        raise ModelLoadError(f"{model_dir} has no config.json; it is not a model directory")
    config = read_json(model_dir / "config.json")
    model_type = str(config.get("model_type", ""))
    arch = architecture_module(model_type)
    args = arch.ModelArgs.from_dict(config)
    model = arch.Model(args)
    weights = arch.sanitize(load_safetensors(model_dir))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(
            f"weights in {model_dir} do not fit a {model_type} model: {exc}"
        ) from exc
    model.eval()
    mx.eval(model.parameters())

    pipeline = read_pipeline(model_dir, arch)
    max_tokens = pipeline.max_tokens or int(config.get("max_position_embeddings", 512))
    if not (model_dir / "tokenizer.json").exists():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json")
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json", max_tokens)
    heads = [dense_head(p) for p in pipeline.dense_dirs]
    dimensions = int(
        read_json(pipeline.dense_dirs[-1] / "config.json")["out_features"]
        if pipeline.dense_dirs
        else config["hidden_size"]
    )
    pad_id = config.get("pad_token_id")
    dtype = str(next(iter(weights.values())).dtype).removeprefix("mlx.core.")
    profile = ModelProfile(
        architecture=model_type,
        dimensions=dimensions,
        max_tokens=max_tokens,
        pooling=pipeline.pooling,
        normalize=pipeline.normalize,
        dtype=dtype,
        prompts=read_prompts(model_dir),
    )
    return EmbeddingEngine(
        name=name,
        source=source,
        revision=revision,
        profile=profile,
        tokenizer=tokenizer,
        model=model,
        heads=heads,
        pad_id=int(pad_id) if isinstance(pad_id, int) else 0,
        memory_bytes=parameter_bytes(model),
    )
