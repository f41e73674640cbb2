"""Models load on demand, are unloaded past the budget or when idle, and health follows."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.service.residency import ModelBudget
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread


def model_copy(root: Path, name: str, break_weights: bool = False) -> Path:
    """A second model directory: links to the bundled files, or a garbled weights file."""
    source = bundled_minilm_dir()
    assert source is not None
    target = root / name
    for file in source.rglob("*"):
        if file.is_file():
            dest = target / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if break_weights and file.suffix == ".safetensors":
                dest.write_bytes(b"\x00garbage, not a safetensors file" * 100)
            else:
                dest.symlink_to(file)
    return target


def states(client: EmbedClient) -> dict[str, str]:
    return {m.name: m.state for m in client.list_models()}


def health_of(target: str, service: str) -> str:
    with EmbedClient(target, timeout=10) as client:
        return client.check(service)


@pytest.fixture()
def lifecycle_server(tmp_path: Path, socket_dir: Path) -> ServerThread:
    dirs = [model_copy(tmp_path, "second"), model_copy(tmp_path, "third")]
    dirs.append(model_copy(tmp_path, "broken", break_weights=True))
    config = ServerConfig(
        socket_path=socket_dir / "embed.sock",
        local_model_dirs=dirs,
        budget=ModelBudget(max_models=2, keep_alive_seconds=1.0),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def test_on_demand_load_budget_keep_alive_and_health(lifecycle_server: ServerThread) -> None:
    target = lifecycle_server.target
    with EmbedClient(target, timeout=60) as client:
        assert states(client)["second"] == "on_disk"
        default = client.embed(["same weights"]).vectors
        # A request for a model on disk loads it; same weights, same vector, own space.
        second = client.embed(["same weights"], model="second")
        np.testing.assert_allclose(second.vectors, default, atol=1e-6)
        assert states(client)["second"] == "loaded"
        assert health_of(target, "second") == "SERVING"
        # Budget of 2: loading "third" unloads the least recently used idle one ("second");
        # the preloaded default is pinned.
        client.embed(["x"], model="third")
        current = states(client)
        assert current["third"] == "loaded"
        assert current["second"] == "on_disk"
        assert current["all-minilm-l6-v2"] == "loaded"
        assert health_of(target, "second") == "NOT_SERVING"
        # Keep-alive: idle for > 1 s, "third" is unloaded; the default stays.
        deadline = time.monotonic() + 10
        while states(client)["third"] == "loaded" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states(client)["third"] == "on_disk"
        assert states(client)["all-minilm-l6-v2"] == "loaded"


def test_corrupted_model_fails_clearly_and_the_server_stays_up(
    lifecycle_server: ServerThread,
) -> None:
    with EmbedClient(lifecycle_server.target, timeout=60) as client:
        with pytest.raises(EmbedClientError) as info:
            client.embed(["x"], model="broken")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "damaged" in info.value.message and "pull it again" in info.value.message
        broken = next(m for m in client.list_models() if m.name == "broken")
        assert broken.state == "failed" and "damaged" in broken.state_reason
        assert client.health().serving
        assert client.embed(["still serving"]).vectors.shape == (1, 384)
