"""Socket set-up: permissions, stale sockets, live servers, things that are not sockets."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from akidb_embed.server import ServerConfig
from akidb_embed.unix_socket import SocketInUse, prepare_socket_path
from tests.conftest import ServerThread


def test_creates_private_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "embed.sock"
    prepare_socket_path(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_group_shared_socket_gets_a_group_readable_directory(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "embed.sock"
    prepare_socket_path(path, socket_mode=0o660)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_stale_socket_is_replaced(socket_dir: Path) -> None:
    path = socket_dir / "embed.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: nothing answers
    prepare_socket_path(path)
    assert not path.exists()


def test_a_file_that_is_not_a_socket_is_never_deleted(socket_dir: Path) -> None:
    path = socket_dir / "embed.sock"
    path.write_text("important")
    with pytest.raises(SocketInUse, match="not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "important"


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SocketInUse, match="world-writable"):
        prepare_socket_path(shared / "embed.sock")


def test_second_server_on_a_live_socket_is_refused(server: ServerThread) -> None:
    path = Path(server.target)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SocketInUse, match="already listening"):
        prepare_socket_path(path)
    second = ServerThread(ServerConfig(socket_path=path, models=[]))
    with pytest.raises(SocketInUse):
        second.start()
    assert path.exists()  # the first server's socket is untouched


def test_socket_mode_is_configurable(socket_dir: Path) -> None:
    path = socket_dir / "group.sock"
    thread = ServerThread(ServerConfig(socket_path=path, models=[], socket_mode=0o660)).start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        thread.stop()
    assert not path.exists()
