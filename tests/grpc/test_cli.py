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
    # Says what exists instead: the server, the service and the loaded model by name.
    assert "no health status for 'no-such-model'" in unknown.stderr
    assert "all-minilm-l6-v2" in unknown.stderr and "EmbeddingService" in unknown.stderr
    assert unknown.stderr.startswith("akidb-embed: error: ")
    assert "Traceback" not in unknown.stderr


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
    piped = run_cli("embed", "--socket", server.target, stdin="from stdin\nanother\n")
    assert [e["text"] for e in json.loads(piped.stdout)["embeddings"]] == ["from stdin", "another"]


def test_blank_stdin_lines_are_an_error(server: ServerThread) -> None:
    # Dropping them would shift every later vector against its line.
    out = run_cli("embed", "--socket", server.target, stdin="one\n\ntwo\n")
    assert out.returncode == 2 and out.stdout == ""
    assert "stdin line 2 is blank" in out.stderr and "grep" in out.stderr


def test_embed_formats(server: ServerThread, tmp_path: Path) -> None:
    texts = ["alpha", "beta gamma", "delta"]
    with EmbedClient(server.target) as client:
        expected = client.embed(texts).vectors
    jsonl = run_cli("embed", "--socket", server.target, "--format", "jsonl", *texts)
    assert jsonl.returncode == 0, jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["text"] for r in rows] == texts
    np.testing.assert_allclose(np.array([r["vector"] for r in rows]), expected, atol=1e-6)
    # npy: binary on stdout, refused on a terminal; read back with numpy.
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    npy = subprocess.run(
        [
            sys.executable,
            "-m",
            "akidb_embed",
            "embed",
            "--socket",
            server.target,
            "--format",
            "npy",
            *texts,
        ],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert npy.returncode == 0, npy.stderr
    (tmp_path / "v.npy").write_bytes(npy.stdout)
    array = np.load(tmp_path / "v.npy")
    assert array.dtype == np.float32 and array.shape == (3, 384)
    np.testing.assert_allclose(array, expected, atol=1e-6)


def test_embed_options_reach_the_server(server: ServerThread) -> None:
    plain = run_cli("embed", "--socket", server.target, "--format", "jsonl", "a question")
    prompted = run_cli(
        "embed", "--socket", server.target, "--format", "jsonl", "--prompt", "query: ", "a question"
    )
    assert plain.returncode == 0 and prompted.returncode == 0, prompted.stderr
    a = np.array(json.loads(plain.stdout)["vector"])
    b = np.array(json.loads(prompted.stdout)["vector"])
    assert json.loads(prompted.stdout)["token_count"] > json.loads(plain.stdout)["token_count"]
    assert float(a @ b) < 0.999
    long_text = "word " * 400
    cut = run_cli("embed", "--socket", server.target, "--truncation", "error", long_text)
    assert cut.returncode == 1 and "INVALID_ARGUMENT" in cut.stderr
    assert (
        run_cli("embed", "--socket", server.target, "--truncation", "end", long_text).returncode
        == 0
    )
    both = run_cli("embed", "--socket", server.target, "--prompt", "x", "--instruction", "y", "t")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_embed_streams_more_texts_than_one_request_takes(server: ServerThread) -> None:
    from akidb_embed.cli.main import STREAM_ABOVE

    texts = [f"line {i}" for i in range(STREAM_ABOVE + 30)]
    out = run_cli("embed", "--socket", server.target, "--format", "jsonl", stdin="\n".join(texts))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["index"] for r in rows] == list(range(len(texts)))
    whole = run_cli("embed", "--socket", server.target, stdin="\n".join(texts))
    assert json.loads(whole.stdout)["model"] == "all-minilm-l6-v2"
    with EmbedClient(server.target) as client:
        expected = client.embed(texts[-3:]).vectors
    np.testing.assert_allclose(np.array([r["vector"] for r in rows[-3:]]), expected, atol=1e-6)
    # A bad text in a stream names its line; nothing partial is printed as JSON.
    texts[5] = "x" * 300_000
    bad = run_cli("embed", "--socket", server.target, stdin="\n".join(texts))
    assert bad.returncode == 1 and bad.stdout == ""
    assert "text 6 " in bad.stderr and "INVALID_ARGUMENT" in bad.stderr


def test_closed_pipe_is_not_a_traceback(server: ServerThread, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    (tmp_path / "in.txt").write_text("\n".join(f"text {i}" for i in range(200)) + "\n")
    command = (
        f"{sys.executable} -m akidb_embed embed --socket {server.target} --format jsonl "
        f"< {tmp_path / 'in.txt'} 2> {tmp_path / 'err.txt'} | head -c 100 > /dev/null; "
        "echo ${PIPESTATUS[0]}"
    )
    out = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120
    )
    errors = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
    assert out.stdout.strip() in ("0", "141")


def test_version() -> None:
    from akidb_embed import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"akidb-embed {__version__}"


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


def test_models_json_means_json_with_a_server_too(server: ServerThread, tmp_path: Path) -> None:
    out = run_cli("models", "--socket", server.target, "--json")
    assert out.returncode == 0, out.stderr
    models = {m["name"]: m for m in json.loads(out.stdout)}
    default = models["all-minilm-l6-v2"]
    assert default["state"] == "loaded" and default["is_default"] is True
    assert default["dimensions"] == 384
    states = {m["state"] for m in models.values()}
    assert states <= {"loaded", "on_disk", "not_downloaded", "loading", "failed"}
    # With no server: the registry and cache, still JSON on stdout, the note on stderr.
    offline = run_cli("models", "--socket", str(tmp_path / "none.sock"), "--json")
    assert offline.returncode == 0, offline.stderr
    rows = json.loads(offline.stdout)
    assert any(r["name"] == "all-minilm-l6-v2" for r in rows)
    assert "no server answers" in offline.stderr


def test_errors_share_one_prefix(server: ServerThread, tmp_path: Path) -> None:
    embed = run_cli("embed", "--socket", str(tmp_path / "none.sock"), "--timeout", "2", "x")
    pull = run_cli("pull", "no-such-model")
    for out in (embed, pull):
        assert out.returncode == 1
        assert out.stderr.startswith("akidb-embed: error: "), out.stderr
    assert "--socket PATH" in embed.stderr  # and what to do about it
    assert "known models" in pull.stderr


def test_serve_refuses_bad_arguments() -> None:
    out = run_cli("serve", "--no-socket")
    assert out.returncode == 1 and "--no-socket needs --port" in out.stderr


def test_a_lower_server_limit_falls_back_to_the_stream(tmp_path: Path) -> None:
    from akidb_embed.api.server import ServerConfig
    from akidb_embed.service.service import Limits

    small = ServerThread(
        ServerConfig(
            socket_path=tmp_path / "s" / "embed.sock", limits=Limits(max_texts_per_request=3)
        )
    ).start()
    try:
        texts = [f"text {i}" for i in range(7)]
        out = run_cli("embed", "--socket", small.target, "--format", "jsonl", *texts)
        assert out.returncode == 0, out.stderr
        assert [json.loads(line)["text"] for line in out.stdout.splitlines()] == texts
    finally:
        small.stop()
