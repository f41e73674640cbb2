"""The distributions install from their paths into clean virtual environments: the client
alone (no MLX, no server), and the server with its embedded default model (no network at run
time, no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ServerThread

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(
    ".venv", "target", "node_modules", "__pycache__", "*.egg-info", "build", "bundled", ".git"
)


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def pip_install(python: Path, *requirements: str) -> None:
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            *list(requirements),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]


CLIENT_SCRIPT = """
import importlib.util, json, sys
# Only the client's own dependencies are there.
missing = [m for m in ("mlx", "akidb_embed", "tokenizers", "torch") if importlib.util.find_spec(m)]
assert not missing, missing
from akidb_embed_client import EmbedClient
with EmbedClient(sys.argv[1], timeout=30) as client:
    result = client.embed(["installed alone"])
    print(json.dumps({"shape": list(result.vectors.shape), "model": result.model,
                      "serving": client.check() in (1, "SERVING")}))
"""


def test_the_client_installs_alone_and_calls_a_server(server: ServerThread, tmp_path: Path) -> None:
    source = tmp_path / "client-src"
    shutil.copytree(REPO / "clients" / "python", source, ignore=IGNORE)
    python = make_venv(tmp_path / "venv")
    pip_install(python, str(source))
    out = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT, server.target],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "shape": [1, 384],
        "model": "all-minilm-l6-v2",
        "serving": True,
    }


@pytest.mark.slow
def test_pip_install_of_the_server_brings_the_default_model(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=IGNORE)
    python = make_venv(tmp_path / "venv")
    pip_install(python, str(source / "clients" / "python"), f"{source}[cpu]")
    bin_dir = python.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Offline, with an empty model cache: only what the install brought.
    env.update(HF_HUB_OFFLINE="1", AKIDB_CACHE_DIR=str(tmp_path / "cache"))
    assert subprocess.run([str(python), "-c", "import torch"], env=env).returncode != 0
    models = subprocess.run(
        [str(bin_dir / "akidb-embed"), "models", "--offline", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    [row] = [r for r in json.loads(models.stdout) if r["name"] == "all-minilm-l6-v2"]
    assert row["status"] == "bundled" and str(tmp_path / "venv") in row["directory"]
    socket = tmp_path / "run" / "embed.sock"
    server = subprocess.Popen(
        [str(bin_dir / "akidb-embed"), "serve", "--socket", str(socket), "--workers", "0"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            health = subprocess.run(
                [str(bin_dir / "akidb-embed"), "health", "--socket", str(socket)],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            if health.returncode == 0:
                break
            assert server.poll() is None, "the server exited"
            time.sleep(0.5)
        out = subprocess.run(
            [str(bin_dir / "akidb-embed"), "embed", "--socket", str(socket), "offline text"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["embeddings"][0]["vector"]) == 384
    finally:
        server.terminate()
        server.wait(60)
