"""A restore's read and checksum in one pass, in C (`readhash.c`), where it can be built.

Python's path reads a segment's rows with `os.preadv` and then hashes them with `xxhash`:
a second pass over ~11 MB per block, from memory rather than the CPU's cache, with Python
between every group of reads. `Reader.read` does both in one call that drops the GIL: `RUN`
bytes read, then hashed while they sit in L2 (`start` and `finish` open and close a segment's hash). On this 2-core machine, in C over 376 MB in the
page cache on two threads: 63-65% of a memcpy's bandwidth against 55% for read-all-then-hash
(BENCHMARKS.md section 10).

The hash is the `xxhash` package's own xxh3-128 (its extension module exports the C
functions), so the digest is the one every block was written with. `load()` is None where
either piece is missing (no C compiler, an `xxhash` built without exported symbols): the
restore then reads in Python, checked the same way.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from . import clib

log = logging.getLogger("agentd.readhash")

SOURCE = Path(__file__).with_name("readhash.c")
STEM = "libagentd_readhash"
RUN = 256 * 1024  # bytes read, then hashed, at a time: half of a core's 512 KB L2 here (256 KB-1 MB: 63-65%)
OK, TRUNCATED, READ_FAILED = 0, 1, 2


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Reader:
    """The bound library, usable from any thread: a segment's hash is `start`ed with its prefix,
    `read` into (one call a run of its rows), and `finish`ed into the digest."""

    def __init__(self, lib: ctypes.CDLL):
        vp = ctypes.c_void_p
        lib.agentd_hash_new.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.agentd_hash_new.restype = vp
        lib.agentd_hash_finish.argtypes = [vp, ctypes.POINTER(ctypes.c_ulonglong)]
        lib.agentd_hash_finish.restype = None
        lib.agentd_hash_drop.argtypes = [vp]
        lib.agentd_hash_drop.restype = None
        lib.agentd_read_hash.argtypes = [ctypes.c_int, ctypes.POINTER(IOVec), ctypes.c_int, ctypes.c_longlong, vp,
                                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        lib.agentd_read_hash.restype = ctypes.c_int
        lib.agentd_advise_huge.argtypes = [vp, ctypes.c_size_t]
        lib.agentd_advise_huge.restype = ctypes.c_int
        self._lib = lib

    def advise_huge(self, address: int, nbytes: int) -> None:
        """Transparent huge pages for the untouched memory of [address, address + nbytes)."""
        self._lib.agentd_advise_huge(address, nbytes)

    def start(self, prefix: bytes) -> int:
        """A new xxh3-128 state that has hashed `prefix` (MemoryError when none can be made)."""
        state = self._lib.agentd_hash_new(prefix, len(prefix))
        if not state:
            raise MemoryError("no memory for an xxh3 state")
        return state

    def read(self, fd: int, chunks: np.ndarray, offset: int, state: int) -> tuple[int, int]:
        """Fill `chunks` (rows of address, length: a C-contiguous uint64 array of shape (n, 2),
        laid out as `struct iovec`) from `fd` at `offset`, in order, hashing the bytes into
        `state`: (OK, 0), or (TRUNCATED | READ_FAILED, errno)."""
        if chunks.dtype != np.uint64 or chunks.ndim != 2 or chunks.shape[1] != 2 or not chunks.flags.c_contiguous:
            raise ValueError("chunks must be a C-contiguous (n, 2) uint64 array")
        err = ctypes.c_int(0)
        status = self._lib.agentd_read_hash(fd, chunks.ctypes.data_as(ctypes.POINTER(IOVec)), len(chunks), offset,
                                            state, RUN, ctypes.byref(err))
        return status, err.value

    def finish(self, state: int) -> str:
        """The state's digest as `xxhash`'s `hexdigest`; the state is freed."""
        out = (ctypes.c_ulonglong * 2)()
        self._lib.agentd_hash_finish(state, out)
        return f"{out[1]:016x}{out[0]:016x}"  # canonical xxh3-128: high 64 bits first

    def drop(self, state: int) -> None:
        self._lib.agentd_hash_drop(state)

    def read_hash(self, fd: int, chunks: np.ndarray, offset: int, prefix: bytes) -> tuple[int, str]:
        """One run of a file: (OK, the xxh3-128 of `prefix` and the bytes), or (status, errno)."""
        state = self.start(prefix)
        status, err = self.read(fd, chunks, offset, state)
        if status != OK:
            self.drop(state)
            return status, str(err)
        return OK, self.finish(state)


_lock = threading.Lock()
_reader: Reader | None = None
_tried = False


def load(cache_dir: Path | None = None) -> Reader | None:
    """The reader, built (once per machine, into the user cache) and bound on first call;
    None where it cannot be (then every later call says so at once)."""
    global _reader, _tried
    with _lock:
        if not _tried:
            _tried = True
            _reader = _bind(cache_dir)
        return _reader


def _bind(cache_dir: Path | None) -> Reader | None:
    import xxhash

    path = clib.build(SOURCE, STEM, cache_dir)
    if path is None:
        log.info("no C compiler for %s: restores read and check in Python", SOURCE.name)
        return None
    try:
        lib = ctypes.CDLL(path)
        hashes = ctypes.CDLL(xxhash._xxhash.__file__)  # already loaded: the same handle, its symbols
        names = ("XXH3_createState", "XXH3_freeState", "XXH3_128bits_reset", _update_symbol(hashes),
                 "XXH3_128bits_digest")
        fns = [ctypes.cast(getattr(hashes, name), ctypes.c_void_p) for name in names]
        lib.agentd_hash_bind.argtypes = [ctypes.c_void_p] * 5
        lib.agentd_hash_bind.restype = None
        lib.agentd_hash_bind(*fns)
        reader = Reader(lib)
    except (OSError, AttributeError) as e:
        log.info("restores read and check in Python: %s", e)
        return None
    if not _agrees(reader):
        log.warning("%s's digest differs from xxhash's: restores read and check in Python", SOURCE.name)
        return None
    return reader


def _update_symbol(hashes: ctypes.CDLL) -> str:
    """The update function to bind: on x86 the package's build picks the widest vector unit
    at run time only in its `_dispatch` entry points (what its Python methods call); the
    plain `XXH3_128bits_update` is its SSE2 baseline, 14-15 GB/s here against 33-37 GB/s
    (AVX2) over 256 KB just read. Both compute the same digest."""
    if hasattr(hashes, "XXH3_128bits_update_dispatch"):
        return "XXH3_128bits_update_dispatch"
    return "XXH3_128bits_update"  # no dispatcher in this build (not x86, or built without it)


def _agrees(reader: Reader) -> bool:
    """One read of a small temp file, hashed both ways: the bound functions are xxh3-128."""
    import tempfile

    import xxhash

    data = bytes(range(256)) * 1031 + b"tail"
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        buf = np.zeros(len(data), np.uint8)
        half = len(data) // 2
        base = buf.ctypes.data
        chunks = np.array([[base, half], [base + half, len(data) - half]], np.uint64)
        status, got = reader.read_hash(f.fileno(), chunks, 0, b"0:1")
    return status == OK and buf.tobytes() == data and got == xxhash.xxh3_128(b"0:1" + data).hexdigest()
