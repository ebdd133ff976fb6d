"""Durable file replacement: a crash leaves the old file or the new one, never a torn one.

Temp files are named `.tmp-<random>-<final name>`: the leading "." means no agent name
(which never starts with ".") can produce one, the random part means no one can plant a
file or link there in advance, and they are created with O_CREAT|O_EXCL|O_NOFOLLOW, so a
link that is there anyway is refused rather than followed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".tmp-"
PRIVATE_FILE_MODE = 0o600


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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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


def temp_path(path: Path, keep_suffix: bool = True) -> Path:
    """`x.safetensors` -> `.tmp-<random>-x.safetensors`: same directory.

    The suffix is kept by default because mx.save_safetensors appends `.safetensors` to a
    path lacking it; `keep_suffix=False` ends the name in `.partial` instead, for
    directories a service manager scans by suffix.
    """
    return path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}{'' if keep_suffix else '.partial'}")


def is_temp(path: Path) -> bool:
    """Whether `path` is one of our temp files (matched by its exact prefix, nothing else)."""
    return Path(path).name.startswith(TEMP_PREFIX)


def create_exclusive(path: Path, mode: int = PRIVATE_FILE_MODE) -> int:
    """A new file at `path`, never an existing file and never through a symbolic link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def open_for_write(tmp: Path) -> BinaryIO:
    """Reopen a temp file `atomic_replace` created, for a writer that needs a file object;
    a link put in its place is refused, not followed."""
    return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "wb")


class NotARegularFile(OSError):
    """Something other than a regular file (a FIFO, a device, a directory) where one was expected."""


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file, without following a link.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, so the
    fstat check can refuse it; the descriptor is then made blocking for ordinary reads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{Path(path).name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def atomic_replace(
    path: Path, write: Callable[[Path], None], mode: int = PRIVATE_FILE_MODE, keep_suffix: bool = True
) -> None:
    """Have `write` produce the file at a fresh temp name, then make it `path` durably.

    Order: create the temp file (exclusively, `mode`), write it, fsync it, rename over
    `path`, fsync the directory. If anything fails the temp file is removed and `path` is
    untouched.
    """
    path = Path(path)
    tmp = temp_path(path, keep_suffix)
    fd = create_exclusive(tmp, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not change what the caller asked for
        os.close(fd)
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE, keep_suffix: bool = True) -> None:
    def write(tmp: Path) -> None:
        with open_for_write(tmp) as f:
            f.write(data)

    atomic_replace(path, write, mode, keep_suffix)
