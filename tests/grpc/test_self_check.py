"""The load-time self-check: a record of probe vectors, compared on every later load."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.errors import ModelLoadError
from akidb_embed.modeling.engine import EmbedOptions
from akidb_embed.modeling.loader import load_engine
from akidb_embed.modeling.precision import Choice, PrecisionPolicy
from akidb_embed.service import model_records
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread
from tests.fixtures import tiny_models as tiny
from tests.fixtures.probe_reference import REFERENCE_FILE


def bundled() -> Path:
    path = bundled_minilm_dir()
    assert path is not None
    return path


def test_bundled_record_matches_sentence_transformers(tmp_path: Path) -> None:
    engine = load_engine(bundled(), name="all-minilm-l6-v2", source="bundled", revision="r1")
    first = model_records.self_check(engine, tmp_path)
    assert first.startswith("recorded 16 probe vectors"), first
    (record_file,) = tmp_path.glob("selfcheck-float32-*.json")
    record = json.loads(record_file.read_text())
    assert record["dtype"] == "float32" and record["mlx"] == model_records.mlx_version()
    recorded = model_records.record_vectors(record)
    reference = np.load(REFERENCE_FILE)
    found = model_records.drift(reference, recorded)
    print(f"record vs sentence-transformers: {found}")
    assert found.min_cosine >= 0.9999 and found.max_abs < 1e-4
    again = model_records.self_check(engine, tmp_path)
    assert again.startswith("passed: min cosine 1.0"), again


def test_a_drift_names_the_mlx_versions_and_what_to_do(tmp_path: Path) -> None:
    engine = load_engine(bundled(), name="m", source="bundled", revision="r1")
    model_records.self_check(engine, tmp_path)
    (record_file,) = tmp_path.glob("selfcheck-*.json")
    record = json.loads(record_file.read_text())
    vectors = model_records.record_vectors(record)
    vectors[:, :8] += 0.01
    record["vectors"] = model_records.make_record(engine, vectors)["vectors"]
    record["mlx"] = "0.0.1"
    record_file.write_text(json.dumps(record))
    with pytest.raises(ModelLoadError) as info:
        model_records.self_check(engine, tmp_path)
    message = info.value.message
    assert "failed its self-check" in message and "MLX is" in message and "0.0.1" in message
    assert str(record_file) in message and "pull m --force" in message


def flip_weight_bits(path: Path, tensor_suffix: str, count: int) -> str:
    """Flip the top mantissa bit of `count` float32 values of one tensor: still valid
    floats, each changed by less than a factor of 2; the file still parses."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in header if k.endswith(tensor_suffix))
    assert header[name]["dtype"] == "F32"
    start = 8 + header_len + header[name]["data_offsets"][0]
    for i in range(count):
        data[start + 4 * (i * 97) + 2] ^= 0x40  # bit 22: the top mantissa bit
    path.write_bytes(bytes(data))
    return name


def test_flipped_weight_bytes_refuse_the_model(
    tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copied"
    shutil.copytree(bundled(), copy)
    config = ServerConfig(socket_path=socket_dir / "embed.sock", models=[], local_model_dirs=[copy])
    thread = ServerThread(config).start()
    try:
        with EmbedClient(thread.target, timeout=120) as client:
            good = client.embed(["a text"], model="copied").vectors
            info = next(m for m in client.list_models() if m.name == "copied")
            assert info.self_check.startswith("recorded"), info.self_check
    finally:
        thread.stop()
    (weights,) = copy.glob("*.safetensors")
    name = flip_weight_bits(weights, "layer.0.attention.self.query.weight", 24)
    thread = ServerThread(config).start()
    try:
        with EmbedClient(thread.target, timeout=120) as client:
            with pytest.raises(EmbedClientError) as error:
                client.embed(["a text"], model="copied")
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "failed its self-check" in error.value.message
            print(f"24 bits flipped in {name}: {error.value.message}")
            info = next(m for m in client.list_models() if m.name == "copied")
            assert info.state == "failed" and "self-check" in info.state_reason
    finally:
        thread.stop()
    # The weights still load and give finite vectors: only the record tells them apart.
    engine = load_engine(copy, name="copied", source=str(copy), revision="x")
    changed = engine.forward([engine.tokenize(["a text"], EmbedOptions())[0].ids])
    changed /= np.linalg.norm(changed, axis=1, keepdims=True)
    assert np.isfinite(changed).all() and float(changed[0] @ good[0]) > 0.999
    assert float(np.abs(changed[0] - good[0]).max()) > 1e-6


def test_precision_policy_keys_the_record_apart(tmp_path: Path) -> None:
    model = tiny.build_qwen3(tmp_path / "tiny-qwen3-f16", dtype=mx.float16)
    folder = tmp_path / "records"
    as_stored = load_engine(
        model, name="t", source="t", revision="r", precision=PrecisionPolicy(upcast=Choice.NEVER)
    )
    upcast = load_engine(
        model, name="t", source="t", revision="r", precision=PrecisionPolicy(upcast=Choice.ALWAYS)
    )
    assert as_stored.profile.dtype == "float16"
    assert upcast.profile.dtype == "float16->float32"
    assert model_records.self_check(as_stored, folder).startswith("recorded")
    # Another precision path: recorded under its own key, never compared with the first.
    assert model_records.self_check(upcast, folder).startswith("recorded")
    assert model_records.self_check(upcast, folder).startswith("passed")
    assert model_records.self_check(as_stored, folder).startswith("passed")
    records = sorted(p.name for p in folder.glob("selfcheck-*.json"))
    assert len(records) == 2 and records[0] != records[1]
    paths = [model_records.record_vectors(json.loads((folder / r).read_text())) for r in records]
    print(f"float16 vs float16->float32 probe vectors: {model_records.drift(*paths)}")
