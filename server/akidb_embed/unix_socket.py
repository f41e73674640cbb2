"""Safe set-up of the Unix domain socket the server listens on."""

from __future__ import annotations

import errno
import socket
import stat
from pathlib import Path

from akidb_embed_client.paths import default_socket_path

__all__ = ["SocketInUse", "default_socket_path", "prepare_socket_path"]


class SocketInUse(Exception):
    """A live server already listens on the path, or the path is not ours to replace."""


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()


def prepare_socket_path(path: Path, socket_mode: int = 0o600) -> None:
    """Make the parent directory if missing (0700, or 0750 when the socket is shared with a
    group), refuse an unsafe one, and remove a stale socket. Never deletes anything that is
    not a socket, nor a live server's socket."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o750 if socket_mode & 0o070 else 0o700, parents=True)
    info = parent.stat()
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise SocketInUse(
            f"{parent} is world-writable: anyone could replace the socket; "
            "choose a directory only this user (or group) can write"
        )
    if not path.exists() and not path.is_symlink():
        return
    mode = path.lstat().st_mode
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(
            f"{path} exists and is not a socket; refusing to delete it: "
            "remove it yourself or choose another --socket path"
        )
    if _is_live(path):
        raise SocketInUse(
            f"another server is already listening on {path}; stop it first, "
            "or start this one with another --socket path"
        )
    path.unlink()
