"""systemd's readiness protocol (`Type=notify`) without libsystemd: one datagram to
$NOTIFY_SOCKET per state change (sd_notify(3)). Outside systemd it does nothing."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager. True if it was sent; False when
    there is no $NOTIFY_SOCKET or it cannot be reached (logged, never raised)."""
    address = os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("ignoring NOTIFY_SOCKET=%r: only Unix socket paths are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify the service manager at %s: %s", address, error)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
