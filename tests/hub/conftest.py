"""Fixtures for the model-store tests: a fake Hub on loopback and a private cache per test."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from .fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
TINY_REPO = "acme/tiny-bert"


def tiny_bert_files(seed: int = 0) -> dict[str, bytes]:
    """A small BERT-shaped repository, with the extras real repositories carry (README,
    pickled and ONNX exports) that a pull must skip."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.standard_normal((1000, 128), dtype=np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal(
            (128, 128), dtype=np.float32
        ),
        "encoder.layer.0.attention.self.query.bias": np.zeros(128, dtype=np.float32),
        "pooler.dense.weight": rng.standard_normal((256, 256)).astype(np.float16),
    }
    config = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 1, "seed": seed}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(tensors),
        "tokenizer.json": b'{"version": "1.0"}',
        "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
        "modules.json": b'[{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"}]',
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "pytorch_model.bin": b"PK\x03\x04 pickled",
        "onnx/model.onnx": b"onnx",
        "onnx/config.json": b"{}",
    }


EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
    "modules.json",
    "1_Pooling/config.json",
}


@dataclass
class HubEnv:
    hub: FakeHub
    cache: Path
    home: Path

    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should see this fake Hub and cache."""
        paths = [str(ROOT / "server"), str(ROOT / "clients" / "python")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEnv]:
    import huggingface_hub.constants as hf_constants

    hub = FakeHub()
    url = hub.start()
    cache = tmp_path / "cache"
    home = tmp_path / "hf-home"
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these at import: keep its telemetry and token file off ~/.cache.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
    hub.repo(TINY_REPO).add_commit(tiny_bert_files())
    try:
        yield HubEnv(hub, cache, home)
    finally:
        hub.stop()
