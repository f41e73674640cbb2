"""The loader on its own: what a model directory's files decide (the sentence-transformers
pipeline: modules.json, Pooling, Dense, Normalize, prompts, sentence_bert_config's
max_seq_length), and the errors for directories it cannot serve: pickled-only weights,
missing or unreadable config and tokenizer, damaged safetensors, weights or Dense modules
that do not fit the architecture.

Tiny random Qwen3 / EmbeddingGemma checkpoints (tests/fixtures/tiny_models.py) are built once
per module; each test edits its own copy.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from akidb_embed.errors import ErrorKind, ModelLoadError
from akidb_embed.modeling.engine import EmbeddingEngine, EmbedOptions
from akidb_embed.modeling.loader import (
    load_engine,
    load_safetensors,
    read_pipeline,
    read_prompts,
    split_folded_dense,
)
from akidb_embed.modeling.models import architecture_module, qwen3
from akidb_embed.modeling.models.base import Pooling
from akidb_embed.modeling.tokenization import Truncation
from akidb_embed.store.registry import bundled_minilm_dir
from tests.fixtures import tiny_models as tiny

QWEN3 = architecture_module("qwen3")
BERT = architecture_module("bert")
LONG_TEXT = " ".join(tiny.WORDS * 8)  # far more tokens than any window here


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "qwen3": tiny.build_qwen3(root / "qwen3"),
        "gemma": tiny.build_gemma3(root / "gemma"),
    }


@pytest.fixture
def qwen_dir(built: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["qwen3"], tmp_path / "qwen3"))


@pytest.fixture
def gemma_dir(built: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["gemma"], tmp_path / "gemma"))


def load(directory: Path) -> EmbeddingEngine:
    return load_engine(directory, name=directory.name, source=str(directory), revision="test")


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def tensor_bytes(*files: Path) -> int:
    total = 0
    for file in files:
        loaded = mx.load(str(file))
        assert isinstance(loaded, dict)
        total += sum(v.nbytes for v in loaded.values())
    return total


def pooling_dir(root: Path, config: dict[str, Any], *, normalize: bool = True) -> Path:
    """A directory with only a modules.json and its Pooling config."""
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if normalize:
        modules.append(("2_Normalize", "Normalize"))
    tiny.write_modules(root, modules)
    tiny.write_json(root / "1_Pooling" / "config.json", config)
    return root


# --- what the files decide -----------------------------------------------------------------


def test_qwen3_profile_comes_from_its_own_files(qwen_dir: Path) -> None:
    engine = load(qwen_dir)
    config = json.loads((qwen_dir / "config.json").read_text())
    profile = engine.profile
    assert profile.architecture == "qwen3"
    assert profile.dimensions == config["hidden_size"]
    assert profile.pooling is Pooling.LAST_TOKEN and profile.normalize
    assert profile.max_tokens == 256 == engine.tokenizer.max_tokens  # sentence_bert_config
    assert dict(profile.prompts) == tiny.QWEN_PROMPTS
    assert profile.instruction_template == qwen3.INSTRUCTION_TEMPLATE
    assert profile.min_dimensions == qwen3.MIN_DIMENSIONS
    assert profile.matryoshka_dimensions == ()
    assert engine.heads == []
    assert engine.network is not None and engine.network.pad_id == config["pad_token_id"]
    # float32 weights computed in float32: the memory is the checkpoint's tensors.
    assert engine.memory_bytes == tensor_bytes(qwen_dir / "model.safetensors")


def test_gemma_dense_modules_run_in_order_and_set_the_width(gemma_dir: Path) -> None:
    pipeline = read_pipeline(gemma_dir, architecture_module("gemma3_text"))
    assert pipeline.dense_dirs == (gemma_dir / "2_Dense", gemma_dir / "3_Dense")
    assert pipeline.pooling is Pooling.MEAN and pipeline.normalize

    engine = load(gemma_dir)
    shapes = [tuple(head.linear.weight.shape) for head in engine.heads]  # type: ignore[attr-defined]
    assert shapes == [(out, inp) for inp, out in tiny.GEMMA_DENSE_SIZES]
    assert engine.profile.dimensions == tiny.GEMMA_DENSE_SIZES[-1][1]
    # Only the Matryoshka sizes below the output width are offered.
    assert engine.profile.matryoshka_dimensions == (512, 256, 128)
    assert engine.profile.min_dimensions is None
    assert dict(engine.profile.prompts) == tiny.GEMMA_PROMPTS
    dense_files = [gemma_dir / d / "model.safetensors" for d in ("2_Dense", "3_Dense")]
    assert engine.memory_bytes == tensor_bytes(gemma_dir / "model.safetensors", *dense_files)


@pytest.mark.parametrize(
    ("arch", "config", "expected"),
    [
        ("qwen3", {"pooling_mode": "mean"}, Pooling.MEAN),
        ("qwen3", {"pooling_mode": "cls"}, Pooling.CLS),
        ("bert", {"pooling_mode": "lasttoken"}, Pooling.LAST_TOKEN),
        (
            "qwen3",
            {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False},
            Pooling.MEAN,
        ),
        ("qwen3", {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, Pooling.CLS),
        ("bert", {"pooling_mode_lasttoken": True}, Pooling.LAST_TOKEN),
    ],
)
def test_pooling_config_overrides_the_architectures_default(
    tmp_path: Path, arch: str, config: dict[str, Any], expected: Pooling
) -> None:
    module = architecture_module(arch)
    assert getattr(module, "DEFAULT_POOLING", Pooling.MEAN) is not expected  # a visible change
    pipeline = read_pipeline(pooling_dir(tmp_path, config), module)
    assert pipeline.pooling is expected
    assert pipeline.dense_dirs == () and pipeline.max_tokens is None


@pytest.mark.parametrize(
    "config",
    [
        {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
        {"pooling_mode_mean_sqrt_len_tokens": True},
        {"pooling_mode": "weightedmean"},
        {},
    ],
)
def test_unsupported_pooling_is_refused_naming_the_supported_modes(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    with pytest.raises(ModelLoadError) as info:
        read_pipeline(pooling_dir(tmp_path, config), BERT)
    assert f"{tmp_path / '1_Pooling'}/config.json" in info.value.message
    assert "does not support; supported: mean, cls, lasttoken" in info.value.message
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION


def test_normalize_follows_modules_json_or_the_architecture(tmp_path: Path, qwen_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    assert read_pipeline(bare, QWEN3).normalize is QWEN3.DEFAULT_NORMALIZE is True
    assert read_pipeline(bare, QWEN3).pooling is QWEN3.DEFAULT_POOLING
    assert read_pipeline(bare, BERT).pooling is Pooling.MEAN
    listed = pooling_dir(tmp_path / "listed", {"pooling_mode": "cls"}, normalize=True)
    assert read_pipeline(listed, BERT).normalize
    unlisted = pooling_dir(tmp_path / "unlisted", {"pooling_mode": "cls"}, normalize=False)
    assert not read_pipeline(unlisted, BERT).normalize

    edit_json(
        qwen_dir / "modules.json",
        lambda modules: [m for m in modules if not m["type"].endswith("Normalize")],
    )
    assert not load(qwen_dir).profile.normalize


def test_unreadable_modules_json_is_a_load_error(qwen_dir: Path) -> None:
    (qwen_dir / "modules.json").write_text("[{")
    with pytest.raises(ModelLoadError, match=r"cannot read .*modules\.json"):
        load(qwen_dir)


@pytest.mark.parametrize(
    ("st_config", "expected"),
    [
        (None, 512),  # no sentence_bert_config.json: config.json's max_position_embeddings
        ({"max_seq_length": None}, 512),
        ({"max_seq_length": 32}, 32),
    ],
)
def test_max_tokens_from_sentence_bert_config_or_the_position_limit(
    qwen_dir: Path, st_config: dict[str, Any] | None, expected: int
) -> None:
    path = qwen_dir / "sentence_bert_config.json"
    if st_config is None:
        path.unlink()
    else:
        path.write_text(json.dumps(st_config))
    engine = load(qwen_dir)
    assert engine.profile.max_tokens == expected == engine.tokenizer.max_tokens
    [cut] = engine.tokenize([LONG_TEXT], EmbedOptions(truncation=Truncation.END))
    assert len(cut.ids) == expected and cut.truncated


def test_prompts_are_the_checkpoints_own_else_the_architectures(
    tmp_path: Path, qwen_dir: Path
) -> None:
    own = {"query": "search: ", "passage": "doc: "}
    (qwen_dir / "config_sentence_transformers.json").write_text(json.dumps({"prompts": own}))
    assert read_prompts(qwen_dir, QWEN3) == own
    (qwen_dir / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}}))
    assert read_prompts(qwen_dir, QWEN3) == QWEN3.DEFAULT_PROMPTS
    (qwen_dir / "config_sentence_transformers.json").unlink()
    assert load(qwen_dir).profile.prompts == QWEN3.DEFAULT_PROMPTS
    assert read_prompts(tmp_path, BERT) == {}  # BERT has no defaults


def test_bundled_minilm_profile_matches_its_files() -> None:
    directory = bundled_minilm_dir()
    if directory is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 is not installed")
    config = json.loads((directory / "config.json").read_text())
    st_config = json.loads((directory / "sentence_bert_config.json").read_text())
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    modules = json.loads((directory / "modules.json").read_text())
    engine = load(directory)
    assert engine.profile.architecture == config["model_type"] == "bert"
    assert engine.profile.dimensions == config["hidden_size"]
    assert engine.profile.max_tokens == st_config["max_seq_length"]
    assert pooling["pooling_mode_mean_tokens"] and engine.profile.pooling is Pooling.MEAN
    assert engine.profile.normalize == any(m["type"].endswith("Normalize") for m in modules)
    assert engine.profile.prompts == {}
    assert engine.tokenizer.vocab_size == config["vocab_size"]


# --- directories that cannot be served -----------------------------------------------------


def test_pickled_only_weights_are_refused_naming_the_files(qwen_dir: Path) -> None:
    (qwen_dir / "model.safetensors").unlink()
    (qwen_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle")
    (qwen_dir / "training_state.ckpt").write_bytes(b"another pickle")
    (qwen_dir / "README.md").write_text("# not weights")
    with pytest.raises(ModelLoadError) as info:
        load(qwen_dir)
    message = info.value.message
    assert f"no *.safetensors in {qwen_dir}" in message
    assert "only pickled weights" in message and "never loads" in message
    assert "pytorch_model.bin" in message and "training_state.ckpt" in message
    assert "README.md" not in message
    assert "use a repository with safetensors weights" in message


def test_a_directory_without_weights_says_so(qwen_dir: Path) -> None:
    (qwen_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="it has no weights; use a repository with safe"):
        load(qwen_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_safetensors_say_which_file_and_what_to_do(qwen_dir: Path, damage: str) -> None:
    weights = qwen_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00not a safetensors file" * 50 if damage == "garbage" else data[:-99])
    with pytest.raises(ModelLoadError) as info:
        load_safetensors(qwen_dir)
    message = info.value.message
    assert message.startswith(f"cannot read weights {weights}: ")
    assert "the file is damaged: delete the model and pull it again" in message
    with pytest.raises(ModelLoadError, match="the file is damaged"):
        load(qwen_dir)


def test_missing_or_unreadable_config(qwen_dir: Path) -> None:
    config = qwen_dir / "config.json"
    text = config.read_text()
    config.unlink()
    with pytest.raises(ModelLoadError, match=r"has no config\.json; it is not a model directory"):
        load(qwen_dir)
    config.write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config\.json is not a JSON object"):
        load(qwen_dir)
    config.write_text(text[: len(text) // 2])
    with pytest.raises(ModelLoadError, match=r"cannot read .*config\.json"):
        load(qwen_dir)


def test_config_missing_a_field_does_not_describe_the_model(qwen_dir: Path) -> None:
    edit_json(
        qwen_dir / "config.json", lambda c: {k: v for k, v in c.items() if k != "hidden_size"}
    )
    with pytest.raises(ModelLoadError) as info:
        load(qwen_dir)
    assert "config.json does not describe a qwen3 model" in info.value.message
    assert "hidden_size" in info.value.message


@pytest.mark.parametrize(("key", "value"), [("head_dim", None), ("num_hidden_layers", None)])
def test_config_value_of_the_wrong_type_is_a_load_error(
    qwen_dir: Path, key: str, value: Any
) -> None:
    edit_json(qwen_dir / "config.json", lambda c: {**c, key: value})
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load(qwen_dir)


def test_missing_or_unreadable_tokenizer(qwen_dir: Path) -> None:
    tokenizer = qwen_dir / "tokenizer.json"
    tokenizer.rename(qwen_dir / "tokenizer.json.old")
    with pytest.raises(ModelLoadError, match=re.escape(f"{qwen_dir} has no tokenizer.json")):
        load(qwen_dir)
    tokenizer.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot read {tokenizer}")):
        load(qwen_dir)


def _drop_first(weights: dict[str, mx.array]) -> None:
    del weights[sorted(weights)[0]]


def _narrow_norm(weights: dict[str, mx.array]) -> None:
    weights["norm.weight"] = mx.zeros((63,))


def _add_extra(weights: dict[str, mx.array]) -> None:
    weights["layers.0.extra.weight"] = mx.zeros((3,))


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (_drop_first, "Missing 1 parameters"),
        (_narrow_norm, "Expected shape (64,) but received shape (63,)"),
        (_add_extra, "not in model"),
    ],
)
def test_weights_that_do_not_fit_the_architecture(
    qwen_dir: Path, change: Callable[[dict[str, mx.array]], None], detail: str
) -> None:
    path = qwen_dir / "model.safetensors"
    weights = mx.load(str(path))
    assert isinstance(weights, dict)
    change(weights)
    mx.save_safetensors(str(path), weights)
    with pytest.raises(ModelLoadError) as info:
        load(qwen_dir)
    assert f"weights in {qwen_dir} do not fit a qwen3 model" in info.value.message
    assert detail in info.value.message


# --- Dense modules -------------------------------------------------------------------------


def set_activation(dense_dir: Path, activation: str) -> None:
    edit_json(dense_dir / "config.json", lambda c: {**c, "activation_function": activation})


def test_tanh_dense_applies_tanh_to_the_linear_output(gemma_dir: Path, tmp_path: Path) -> None:
    identity = load(gemma_dir)
    tanh_dir = Path(shutil.copytree(gemma_dir, tmp_path / "gemma-tanh"))
    set_activation(tanh_dir / "3_Dense", "torch.nn.modules.activation.Tanh")
    tanh = load(tanh_dir)
    ids = [t.ids for t in identity.tokenize(tiny.sample_texts(4, seed=3), EmbedOptions())]
    linear = identity.forward(ids)
    squashed = tanh.forward(ids)
    assert np.abs(linear).max() > 1  # so tanh visibly changes these vectors
    np.testing.assert_allclose(squashed, np.tanh(linear), atol=1e-5)


def test_unsupported_dense_activation_is_refused(gemma_dir: Path) -> None:
    set_activation(gemma_dir / "2_Dense", "torch.nn.modules.activation.ReLU")
    with pytest.raises(ModelLoadError) as info:
        load(gemma_dir)
    assert "Dense activation 'ReLU'" in info.value.message
    assert str(gemma_dir / "2_Dense") in info.value.message
    assert "not supported" in info.value.message


def test_dense_module_without_weights_is_refused(gemma_dir: Path) -> None:
    (gemma_dir / "3_Dense" / "model.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match=re.escape(f"the Dense module {gemma_dir / '3_Dense'} has no")
    ):
        load(gemma_dir)


def test_dense_weights_of_the_wrong_width_do_not_fit(gemma_dir: Path) -> None:
    inp, out = tiny.GEMMA_DENSE_SIZES[1]
    wrong = mx.zeros((out, inp + 8))
    mx.save_safetensors(str(gemma_dir / "3_Dense" / "model.safetensors"), {"linear.weight": wrong})
    with pytest.raises(ModelLoadError) as info:
        load(gemma_dir)
    assert f"Dense weights ({gemma_dir / '3_Dense'}) do not fit" in info.value.message


def test_split_folded_dense_pops_numbered_modules_in_numeric_order() -> None:
    weights = {
        "dense.10.weight": mx.full((2, 2), 10.0),
        "dense.2.weight": mx.full((2, 2), 2.0),
        "dense.2.bias": mx.full((2,), 2.5),
        "dense.head.weight": mx.zeros((1,)),
        "model.dense.0.weight": mx.zeros((1,)),
        "layers.0.weight": mx.zeros((1,)),
    }
    folded = split_folded_dense(weights)
    assert [sorted(f) for f in folded] == [["bias", "weight"], ["weight"]]
    assert float(folded[0]["weight"][0, 0]) == 2.0 and float(folded[0]["bias"][0]) == 2.5
    assert float(folded[1]["weight"][0, 0]) == 10.0
    assert sorted(weights) == ["dense.head.weight", "layers.0.weight", "model.dense.0.weight"]
    assert split_folded_dense({"layers.0.weight": mx.zeros((1,))}) == []


# --- limits the files cannot raise ---------------------------------------------------------


def test_max_tokens_never_exceed_the_position_table(tmp_path: Path) -> None:
    source = bundled_minilm_dir()
    if source is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 is not installed")
    copy = tmp_path / "minilm-long"
    copy.mkdir()
    for item in source.iterdir():
        (copy / item.name).symlink_to(item)
    (copy / "sentence_bert_config.json").unlink()
    (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 1024}))
    positions = json.loads((source / "config.json").read_text())["max_position_embeddings"]
    try:
        engine = load(copy)
    except ModelLoadError:
        return  # refusing the checkpoint is as good as capping the window
    assert engine.profile.max_tokens <= positions
