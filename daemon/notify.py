"""systemd's readiness protocol (sd_notify) in a few lines of stdlib.

The daemon calls ``notify("READY=1")`` once the model is loaded and the socket listens, and
``notify("STOPPING=1")`` when asked to shut down. Under launchd, or when run by hand,
``$NOTIFY_SOCKET`` is unset and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) as one datagram to ``$NOTIFY_SOCKET``.

    Returns True if it was sent; False when the variable is unset, names an address this
    does not support (only filesystem paths and Linux abstract ``@name`` addresses are), or
    the send fails. Never raises: a lost notification must not take the daemon down; systemd
    reports it as a start timeout instead.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # Abstract namespace: the leading "@" stands for a NUL byte.
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a supported address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("notify(%r) to NOTIFY_SOCKET failed: %s", state, exc)
        return False
    return True
