"""Is the daemon answering? The one seam between the service commands and the client.

Uses ``agentctl.client.Client(socket_path).ping()`` when that module exists; until then (or
if it fails to import) it settles for "the socket accepts a connect()".
"""

from __future__ import annotations

import socket
import time
from pathlib import Path


def _accepts_connect(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path))
        except OSError:
            return False
    return True


def ping(socket_path: Path, timeout: float = 5.0) -> bool:
    """One attempt: True if the daemon at ``socket_path`` answers within ``timeout`` s."""
    try:
        from agentctl.client import Client
    except ImportError:
        return _accepts_connect(socket_path)
    try:
        client = Client(str(socket_path), timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            close = getattr(client, "close", None)
            if callable(close):
                close()
    except Exception:  # the client's own errors included: "not yet" is all that matters here
        return False


def wait_until_ready(socket_path: Path, timeout: float) -> bool:
    """Ping until the daemon answers or ``timeout`` seconds pass; at least one attempt."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        if ping(Path(socket_path), timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 1.0)
