"""Where the server listens by default; the server and every client share this one copy."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "AKIDB_EMBED_SOCKET"


def default_socket_path() -> Path:
    """$AKIDB_EMBED_SOCKET, else `$XDG_RUNTIME_DIR/akidb-embed/embed.sock`, else
    `/tmp/akidb-embed-$UID/embed.sock` (a directory only that user may write)."""
    if env := os.environ.get(SOCKET_ENV):
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "akidb-embed" if runtime else Path(f"/tmp/akidb-embed-{os.getuid()}")
    return base / "embed.sock"
