"""The one-pass read and checksum of a restore (readhash.c): the bytes land where asked, the
digest is xxhash's xxh3-128 of the prefix and the bytes, and a short file is reported, however
the buffers fall across the C side's runs of reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xxhash

from agentd import readhash
from agentd.restore_arrays import unwritten_arrays


@pytest.fixture(scope="module")
def reader():
    r = readhash.load()
    if r is None:
        pytest.skip("no C compiler here")
    return r


def chunks_of(buf: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, at = [], 0
    for n in sizes:
        out.append([buf.ctypes.data + at, n])
        at += n
    return np.array(out, np.uint64).reshape(-1, 2)


# Buffers smaller than, equal to, and larger than one run; empty ones; more than a batch of 64.
SPLITS = [[readhash.RUN * 3 + 17], [1, 0, readhash.RUN, 5, readhash.RUN - 1, 0], [4096] * 200, [3] * 70 + [readhash.RUN * 2]]


@pytest.mark.parametrize("sizes", SPLITS, ids=["one", "mixed", "many", "tiny-then-large"])
def test_reads_land_in_place_and_the_digest_is_xxh3_of_prefix_and_bytes(reader, tmp_path, sizes):
    total = sum(sizes)
    data = np.random.default_rng(len(sizes)).integers(0, 256, total + 1000, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    buf = np.zeros(total, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        status, digest = reader.read_hash(fd, chunks_of(buf, sizes), 1000, b"7:3")
    finally:
        os.close(fd)
    assert status == readhash.OK
    assert buf.tobytes() == data[1000:]
    assert digest == xxhash.xxh3_128(b"7:3" + data[1000:]).hexdigest()


def test_a_file_shorter_than_the_buffers_is_truncated(reader, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 5000)
    buf = np.zeros(8192, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert reader.read_hash(fd, chunks_of(buf, [4096, 4096]), 0, b"")[0] == readhash.TRUNCATED
    finally:
        os.close(fd)


def test_a_read_that_fails_says_so(reader, tmp_path):
    buf = np.zeros(16, np.uint8)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: preadv fails with EISDIR
    try:
        status, err = reader.read_hash(fd, chunks_of(buf, [16]), 0, b"")
    finally:
        os.close(fd)
    assert status == readhash.READ_FAILED and err != "0"


def test_unwritten_arrays_are_the_shapes_and_dtypes_asked_and_writable():
    import mlx.core as mx

    from agentd.kvrows import _shared_view

    arrays = unwritten_arrays([(1, 3, 512, 64), (1, 2, 256, 8)], ["float32", "uint16"])
    assert [a.shape for a in arrays] == [(1, 3, 512, 64), (1, 2, 256, 8)]
    assert [a.dtype for a in arrays] == [mx.float32, mx.uint16]
    view = _shared_view(arrays[0])
    view[0, 1, 7, :] = 2.5
    assert float(arrays[0][0, 1, 7, 3]) == 2.5


def thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text[text.index("[") + 1:text.index("]")]


def test_memory_advised_before_its_first_touch_faults_in_huge_pages(reader):
    """After an eviction a restore's arrays are new memory: advised, its pages come 2 MiB at a
    time (Linux with transparent huge pages in `madvise` or `always` mode)."""
    import ctypes
    import mmap

    if thp_mode() not in ("madvise", "always"):
        pytest.skip("no transparent huge pages here")
    region = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc maps it
    buf = (ctypes.c_char * len(region)).from_buffer(region)
    start = ctypes.addressof(buf)
    reader.advise_huge(start, len(region))
    np.frombuffer(region, np.uint8)[::4096] = 1  # first touch
    huge_kb, mine = None, False
    for line in open("/proc/self/smaps").read().splitlines():
        span = line.split(" ", 1)[0]
        if "-" in span and not span.endswith(":"):  # a mapping's header line: lo-hi perms ...
            lo, hi = (int(x, 16) for x in span.split("-"))
            mine = lo <= start < hi
        elif mine and line.startswith("AnonHugePages:"):
            huge_kb = int(line.split()[1])
    del buf
    region.close()
    assert huge_kb is not None and huge_kb >= 8 << 10, huge_kb  # of 16 MiB, at least the aligned 14


def test_the_hash_bound_is_the_packages_run_time_dispatched_one():
    """xxhash's x86 build picks AVX2 at run time only in its `_dispatch` entry points; the
    plain update is its SSE2 baseline, 2.5x slower over a run just read. Where the package
    exports the dispatcher, the restore hashes with it (the digest tests above: same xxh3)."""
    import ctypes

    hashes = ctypes.CDLL(xxhash._xxhash.__file__)
    if not hasattr(hashes, "XXH3_128bits_update_dispatch"):
        pytest.skip("this xxhash build has no run-time dispatch")
    assert readhash._update_symbol(hashes) == "XXH3_128bits_update_dispatch"
