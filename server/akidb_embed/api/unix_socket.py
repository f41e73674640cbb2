"""Safe set-up of the Unix domain socket the server listens on."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def _unsafe_ancestor(directory: Path) -> Path | None:
    """The first directory on the way to `directory` (itself included) that anyone may write
    without the sticky bit: there another user could rename what lies below and put their
    own directory, and socket, in its place. Both the path as written and the one its
    symbolic links lead to are checked."""
    written = Path(os.path.abspath(directory))
    seen: set[Path] = set()
    for chain in (written, written.resolve()):
        for folder in [chain, *chain.parents]:
            if folder in seen:
                continue
            seen.add(folder)
            mode = folder.stat().st_mode
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                return folder
    return None


def prepare_socket_path(
    path: Path, socket_mode: int = 0o600, *, trust_parents: bool = False
) -> None:
    """Make the parent directory if missing (0700, or 0750 when the socket is shared with a
    group), refuse an unsafe one, and remove a stale socket. Never deletes anything that is
    not a socket, nor a live server's socket.

    Unsafe: the socket's directory, or any directory above it, is world-writable without the
    sticky bit (/tmp, sticky, is fine). `trust_parents` accepts such directories above the
    socket's own (a volume only this user's containers share); never the directory itself."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o750 if socket_mode & 0o070 else 0o700, parents=True)
    info = parent.stat()
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise SocketInUse(
            f"{parent} is world-writable: anyone could replace the socket; "
            "choose a directory only this user (or group) can write"
        )
    unsafe = None if trust_parents else _unsafe_ancestor(parent)
    if unsafe is not None:
        raise SocketInUse(
            f"{unsafe}, above the socket directory {parent}, is world-writable without the "
            f"sticky bit: another user could move {parent} aside and put their own socket in "
            "its place; choose a socket path whose parent directories only their owners can "
            "write (e.g. $XDG_RUNTIME_DIR/akidb-embed/embed.sock), or pass "
            "--trust-socket-parents if nobody else can reach that directory"
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


@dataclass(frozen=True)
class BoundSocket:
    """The socket file a server created: who it is, to remove it only while it is still ours."""

    path: Path
    device: int
    inode: int
    # File systems reuse inode numbers (tmpfs does at once): the change time tells a new
    # socket at the same inode from ours. Taken after the last chmod.
    changed_ns: int

    @classmethod
    def of(cls, path: Path) -> BoundSocket:
        info = path.lstat()
        return cls(path, info.st_dev, info.st_ino, info.st_ctime_ns)

    def remove(self) -> Literal["removed", "gone", "replaced"]:
        """Unlink the path if it is still this socket. A server started on the same path while
        this one drained owns the path now ("replaced"): leave its socket alone. "gone": no
        file is there any more (gRPC may unlink its own socket when it stops)."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return "gone"
        if (info.st_dev, info.st_ino, info.st_ctime_ns) != (
            self.device,
            self.inode,
            self.changed_ns,
        ):
            return "replaced"
        self.path.unlink(missing_ok=True)
        return "removed"
