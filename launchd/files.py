"""Atomic file replacement for service definitions (agentd.atomic does the work)."""

from __future__ import annotations

from pathlib import Path

from agentd.atomic import atomic_write_bytes


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a torn one.

    The mode is set explicitly so the umask cannot change it. The temp name ends in
    ``.partial``, not ``.plist``/``.service``: neither launchd nor systemd picks up a leftover.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode, keep_suffix=False)
