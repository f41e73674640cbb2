"""Socket set-up: permissions, stale sockets, live servers, things that are not sockets."""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.api.unix_socket import BoundSocket, SocketInUse, prepare_socket_path
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


def test_private_directory_inside_a_world_writable_parent_is_refused(tmp_path: Path) -> None:
    # Anyone may rename entries of a 0777 non-sticky directory: another user could move
    # `private` aside and put their own directory, and socket, in its place.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    private = shared / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(SocketInUse, match=r"shared, above the socket directory .* sticky"):
        prepare_socket_path(private / "embed.sock")
    with pytest.raises(SocketInUse, match="world-writable"):
        prepare_socket_path(shared / "new" / "embed.sock")  # and a directory made there
    # Through a symbolic link too.
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(SocketInUse, match="world-writable"):
        prepare_socket_path(link / "embed.sock")
    # An operator who knows nobody else reaches that volume may say so.
    prepare_socket_path(private / "embed.sock", trust_parents=True)


def test_sticky_world_writable_parent_is_fine(tmp_path: Path) -> None:
    shared = tmp_path / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: only an entry's owner may rename it
    prepare_socket_path(shared / "mine" / "embed.sock")
    assert stat.S_IMODE((shared / "mine").stat().st_mode) == 0o700


def test_a_draining_server_leaves_the_next_servers_socket_alone(socket_dir: Path) -> None:
    """Server B starts on the path while A drains; A's exit must not delete B's socket."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from akidb_embed_client import EmbedClient

    path = socket_dir / "embed.sock"
    first = ServerThread(ServerConfig(socket_path=path, models=[])).start()
    channel = grpc.insecure_channel(f"unix:{path}")
    # An open Watch keeps A draining until its grace runs out.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopping = threading.Thread(target=first.stop, kwargs={"grace": 4})
    stopping.start()
    second = None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # A stops listening as soon as it drains
            try:
                probe = socket.socket(socket.AF_UNIX)
                probe.connect(str(path))
                probe.close()
                time.sleep(0.05)
            except OSError:
                break
        assert stopping.is_alive(), "A should still be draining"
        second = ServerThread(ServerConfig(socket_path=path, models=[])).start()
        stopping.join(30)
        assert not stopping.is_alive()
        assert path.exists(), "A deleted the socket B listens on"
        with EmbedClient(str(path), timeout=10) as client:
            assert client.check() == "SERVING"
    finally:
        watch.cancel()
        channel.close()
        stopping.join(30)
        if second is not None:
            second.stop()
    assert not path.exists()  # B removes its own socket


def test_a_server_removes_only_its_own_socket_and_says_which_case(tmp_path: Path) -> None:
    def bind(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        return sock

    path = tmp_path / "embed.sock"
    with bind(path):
        ours = BoundSocket.of(path)
        assert ours.remove() == "removed" and not path.exists()
        assert ours.remove() == "gone"  # e.g. gRPC unlinked it when it stopped
    with bind(path):
        stale = BoundSocket.of(path)
    path.unlink()
    with bind(path):  # another server took the path meanwhile
        assert stale.remove() == "replaced" and path.exists()
