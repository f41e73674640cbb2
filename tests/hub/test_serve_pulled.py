"""The server and the model store together: a known model that is not cached gets
FAILED_PRECONDITION with the pull command; once pulled it loads on request; with
--allow-downloads the server pulls it itself."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.store.registry import Registry, bundled_minilm_dir
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread

from .conftest import HubEnv

BGE = "bge-small-en-v1.5"


def publish_minilm(hub_env: HubEnv, repo: str) -> str:
    bundled = bundled_minilm_dir()
    if bundled is None:
        pytest.skip("the embedded default model is missing: run make setup")
    files = {str(p.relative_to(bundled)): p.read_bytes() for p in bundled.rglob("*") if p.is_file()}
    return hub_env.hub.repo(repo).add_commit(files)


def test_not_cached_then_pulled_then_served(hub_env: HubEnv, socket_dir: Path) -> None:
    commit = publish_minilm(hub_env, "BAAI/bge-small-en-v1.5")
    thread = ServerThread(ServerConfig(socket_path=socket_dir / "embed.sock")).start()
    try:
        with EmbedClient(thread.target, timeout=60) as client:
            state = {m.name: m for m in client.list_models()}[BGE]
            assert state.state == "not_downloaded"
            with pytest.raises(EmbedClientError) as info:
                client.embed(["x"], model=BGE)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"akidb-embed pull {BGE}" in info.value.message

            Registry().pull(Registry().resolve(BGE), progress=False)
            assert {m.name: m for m in client.list_models()}[BGE].state == "on_disk"
            result = client.embed(["a pulled model"], model=BGE)
            default = client.embed(["a pulled model"]).vectors
            np.testing.assert_allclose(result.vectors, default, atol=1e-6)  # same weights
            assert result.space.model_id == "BAAI/bge-small-en-v1.5"
            assert result.space.revision == commit
            loaded = {m.name: m for m in client.list_models()}[BGE]
            assert loaded.state == "loaded" and loaded.revision == commit
    finally:
        thread.stop()


def test_allow_downloads_pulls_a_hub_id_on_first_request(hub_env: HubEnv, socket_dir: Path) -> None:
    publish_minilm(hub_env, "acme/minilm-copy")
    config = ServerConfig(socket_path=socket_dir / "embed.sock", allow_downloads=True)
    thread = ServerThread(config).start()
    try:
        with EmbedClient(thread.target, timeout=120) as client:
            result = client.embed(["pulled on demand"], model="acme/minilm-copy")
            assert result.vectors.shape == (1, 384)
            assert hub_env.hub.gets("model.safetensors")
            with pytest.raises(EmbedClientError) as info:
                client.embed(["x"], model="acme/does-not-exist")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        thread.stop()
