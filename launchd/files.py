"""Atomic file replacement for service definitions."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def _fsync(fd: int) -> None:
    # Plain fsync on macOS stops at the drive's cache; F_FULLFSYNC reaches the platter.
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a torn one.

    Temp file in the same directory, fsync, ``os.replace``, fsync the directory. The mode is
    set explicitly so the umask cannot change it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # No .plist/.service suffix: neither launchd nor systemd will pick up a leftover.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
