"""systemd's Type=notify protocol: READY=1 once SERVING, STOPPING=1 when the drain starts,
on a datagram socket the test creates (as systemd does)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from akidb_embed.api import sdnotify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("SERVING on unix:/x")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=SERVING on unix:/x"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_does_nothing_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()


def test_an_unreachable_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sdnotify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not sdnotify.ready()


def test_abstract_socket_names_work(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"akidb-embed-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_the_server_notifies_ready_when_serving_and_stopping_on_sigterm(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    sock_path = tmp_path / "run" / "embed.sock"
    log = (tmp_path / "server.log").open("w+")  # a file, not a pipe: nothing can fill it up
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "akidb_embed",
            "serve",
            "--socket",
            str(sock_path),
            "--workers",
            "0",
            "--grace",
            "5",
        ],
        env=env,
        stderr=log,
        text=True,
    )
    try:
        notify_socket.settimeout(120)
        message = notify_socket.recv(4096).decode()
        assert message.startswith("READY=1\n"), message
        assert f"unix:{sock_path}" in message
        # READY comes after SERVING: the socket answers health checks now.
        health = subprocess.run(
            [sys.executable, "-m", "akidb_embed", "health", "--socket", str(sock_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.stdout.strip() == "SERVING", health.stderr
        server.send_signal(signal.SIGTERM)
        notify_socket.settimeout(30)
        assert notify_socket.recv(4096).decode().startswith("STOPPING=1")
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log.seek(0)
    stderr = log.read()
    log.close()
    # The first-time hint: the command that embeds a text with this server.
    [hint] = [line for line in stderr.splitlines() if line.startswith("try: ")]
    assert f"embed --socket {sock_path}" in hint and "hello world" in hint
