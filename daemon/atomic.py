"""Durable file replacement: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable

PARTIAL_MARK = ".partial"


def full_fsync(fd: int) -> None:
    """fsync that reaches the platter: on macOS plain fsync stops at the drive's cache."""
    if sys.platform == "darwin" and hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # some filesystems (e.g. network) refuse it; fsync is the best left
    os.fsync(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """`x.safetensors` -> `x.partial.safetensors`: same directory, same suffix.

    The suffix is kept because mx.save_safetensors appends `.safetensors` to a path lacking it.
    """
    return path.with_name(path.stem + PARTIAL_MARK + path.suffix)


def is_partial(path: Path) -> bool:
    return PARTIAL_MARK in path.name


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write` produce the file at a temp name, then make it `path` durably.

    Order: write temp, fsync it, rename over `path`, fsync the directory. If anything
    fails the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    atomic_replace(path, write)
