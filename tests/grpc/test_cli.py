"""The `akidb-embed` command against a real server, and its errors without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    return subprocess.run(
        [sys.executable, "-m", "akidb_embed", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_health_exit_code_is_a_probe(server: ServerThread, tmp_path: Path) -> None:
    ok = run_cli("health", "--socket", server.target)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "SERVING"
    missing = run_cli("health", "--socket", str(tmp_path / "nothing.sock"), "--timeout", "2")
    assert missing.returncode == 1
    assert "no akidb-embed server answers" in missing.stderr
    assert "akidb-embed serve" in missing.stderr
    unknown = run_cli("health", "--socket", server.target, "--service", "no-such-model")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr


def test_embed_prints_json_vectors(server: ServerThread) -> None:
    out = run_cli("embed", "--socket", server.target, "first text", "second text")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"] == "all-minilm-l6-v2"
    assert [e["text"] for e in data["embeddings"]] == ["first text", "second text"]
    vectors = np.array([e["vector"] for e in data["embeddings"]], dtype=np.float32)
    with EmbedClient(server.target) as client:
        expected = client.embed(["first text", "second text"]).vectors
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    piped = run_cli("embed", "--socket", server.target, stdin="from stdin\n\nanother\n")
    assert [e["text"] for e in json.loads(piped.stdout)["embeddings"]] == ["from stdin", "another"]


def test_embed_errors_are_actionable(server: ServerThread) -> None:
    unknown = run_cli("embed", "--socket", server.target, "--model", "nope", "x")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "known models" in unknown.stderr
    empty = run_cli("embed", "--socket", server.target, stdin="")
    assert empty.returncode == 2 and "no texts" in empty.stderr
    bad_dims = run_cli("embed", "--socket", server.target, "--dimensions", "5", "x")
    assert bad_dims.returncode == 1 and "INVALID_ARGUMENT" in bad_dims.stderr


def test_models_lists_the_default(server: ServerThread) -> None:
    out = run_cli("models", "--socket", server.target)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("all-minilm-l6-v2"))
    assert "(default)" in line and "loaded" in line and "384" in line


def test_serve_refuses_bad_arguments() -> None:
    out = run_cli("serve", "--no-socket")
    assert out.returncode == 1 and "--no-socket needs --port" in out.stderr
