"""The arrays a restore fills: made at their final size, where the reads can reach them.

`read_rows` (CPU, Apple unified memory): MLX's arrays are host memory, which the read threads
fill straight from the files: unwritten arrays read and hashed in one pass in C where
`readhash` is built, else zeroed arrays made in groups while the rows of the groups made so far
are read and hashed in Python. `RowTarget` (everywhere else): arrays allocated first and filled
by `fill`; on CUDA each block goes to a pinned slot, is checked there, and the copy engine
moves it into GPU arrays (`cuda_copy`). Both leave one of mlx-lm's 256-row steps to spare
(`rows_to_allocate`). `restore_reads` drives them; `kvrows` has the layout and the row I/O.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
from concurrent import futures
from typing import Callable

import mlx.core as mx
import numpy as np
import xxhash

from . import graph_kernels, readhash
from .kvrows import RowLayout, RowsError, Segment, _host_dtype, _shared_view, install, read_buffers, row_buffers
from .switches import switched_off

# On CUDA, make a restore's arrays while its first blocks are read (RowTarget.allocate);
# "0" makes them first, as before (env: benchmarks/gpu.py restore compares the two).
OVERLAP_ARRAYS = os.environ.get("AGENTD_RESTORE_OVERLAP", "1").strip() != "0"
ARRAYS_WAIT_S = 600.0  # a read thread's wait for them: far beyond any restore, short of forever


def rows_to_allocate(n_tokens: int, step: int = 256) -> int:
    """Rows a restore of `n_tokens` allocates: at least one of mlx-lm's `step`s to spare."""
    return -(-(n_tokens + step) // step) * step


class RowTarget:
    """Full-attention arrays allocated at their final size, filled in place by reads.

    `n_alloc` leaves at least one of mlx-lm's 256-token steps to spare, so the next turn's
    tokens go into rows already there instead of a grow-and-copy of the whole cache. Where
    MLX's arrays are host memory it can export (CPU, Apple unified memory) reads land in
    them directly.
    On CUDA they land in pinned host memory and the copy engine moves them into the arrays
    (`cuda_copy`); without a usable CUDA runtime, straight into the managed arrays; where
    MLX exports no writable buffer at all, in host arrays uploaded once by `install`.
    """

    def __init__(self, layout: RowLayout, n_tokens: int, step: int = 256):
        self.layout = layout
        self._lock = threading.Lock()
        self.timings = {"arrays_ms": 0.0, "read_ms": 0.0, "copy_ms": 0.0, "fills": 0}
        # At least one step of rows to spare: a follow-up of up to `step` tokens lands in
        # rows already there. Without it a restore that ends near a step boundary makes the
        # next turn grow the cache, which copies all of it into new memory (on CUDA, 0.2 s
        # at 32k tokens of llama-8B for the first touch of that memory alone).
        self.n_alloc = rows_to_allocate(n_tokens, step)
        self.arrays: list[mx.array] | None = None
        self._staging = _cuda_staging()
        self._owner = threading.get_ident()
        self._ready = threading.Event()
        self._arrays_error: BaseException | None = None
        if self._staging is None or not OVERLAP_ARRAYS:
            self.allocate()
        # Staged (CUDA): the arrays are made by `allocate`, on the caller's thread, while
        # the read threads already read and check blocks into their pinned slots; each
        # fill waits for the arrays only to copy into them. Making 4.3 GB of new managed
        # memory takes ~0.2 s on an H200 (its first touch), as long as reading 2 GB.

    def allocate(self) -> None:
        """Make the arrays (once; on the thread that owns MLX, the one that made this)."""
        if self._ready.is_set():
            if self._arrays_error is not None:
                raise self._arrays_error
            return
        t0 = time.perf_counter()
        try:
            self._make_arrays()
        except BaseException as e:
            self._arrays_error = e
            raise
        finally:
            self.timings["arrays_ms"] = (time.perf_counter() - t0) * 1000
            self._ready.set()

    def _make_arrays(self) -> None:
        layout = self.layout
        # With staged copies the arrays are made in their host dtypes (bfloat16 as uint16),
        # so their buffers export directly, and are viewed back by `install`.
        dtype = (lambda s: getattr(mx, _host_dtype(s.dtype))) if self._staging else (lambda s: getattr(mx, s.dtype))
        arrays = []
        for spec in layout.arrays:
            # Zeroed on the default stream. On CUDA that is a GPU kernel, so the pages start
            # out on the GPU, where the staged copies write them (and where a host fill
            # faults them over: still faster than zeroing on the CPU stream, measured on an
            # H200 with gpu.py split, 1.07 GB: 0.002 + 0.11 + 0.09 s for zeros, fill and
            # first GPU pass against 0.37 + 0.05 + 0.10 s).
            arrays.append(mx.zeros((1, spec.heads, self.n_alloc, spec.width), dtype=dtype(spec)))
        mx.eval(arrays)
        self.arrays = arrays
        try:
            self.views = [_shared_view(a) for a in self.arrays]
        except (TypeError, ValueError, RuntimeError):
            self.arrays, self._staging = None, None  # staged on the host instead
            self.views = [np.zeros((1, s.heads, self.n_alloc, s.width), dtype=_host_dtype(s.dtype))
                          for s in layout.arrays]
        if self._staging is not None:
            mx.synchronize()  # the zeros are written before any copy lands
            self._dst = [v.ctypes.data for v in self.views]

    def _wait_arrays(self) -> None:
        if not self._ready.is_set() and threading.get_ident() == self._owner:
            self.allocate()  # a fill on the owner's thread (a tail): nobody else would
        if not self._ready.wait(ARRAYS_WAIT_S):
            raise RowsError("the cache's arrays were never made (RowTarget.allocate not called)")
        if self._arrays_error is not None:
            raise RowsError(f"the cache's arrays could not be made: {self._arrays_error}")

    def buffers(self, lo: int, hi: int) -> list[memoryview]:
        """The arrays' own rows [lo, hi), in storage order (host-visible memory)."""
        return row_buffers(self.views, lo, hi)

    def fill(self, lo: int, hi: int, read: Callable[[list[memoryview]], None]) -> None:
        """Rows [lo, hi) from `read`, which fills the buffers it is given in storage order and
        checks them (raising if they must not be used): nothing it refused reaches the cache.
        Safe to call from several threads for disjoint rows."""
        t0 = time.perf_counter()
        staging = self._staging
        if staging is None:
            self._wait_arrays()
            read(self.buffers(lo, hi))
            self._count(t0, time.perf_counter())
            return
        from . import cuda_copy

        n = hi - lo
        row_bytes = [s.width * getattr(mx, s.dtype).size for s in self.layout.arrays]
        sizes = [s.heads * n * rb for s, rb in zip(self.layout.arrays, row_bytes)]
        try:
            slot = staging.take(sum(sizes))
        except cuda_copy.CudaError as e:
            self._wait_arrays()
            self._give_up_staging(e)
            read(self.buffers(lo, hi))
            self._count(t0, time.perf_counter())
            return
        try:
            # In the slot the rows lie in storage order, back to back: one buffer to read
            # into and hash (one iovec, not one per head and array).
            read([memoryview(slot.host[:sum(sizes)])])  # raises: nothing is copied
            t1 = time.perf_counter()
            self._wait_arrays()
            if self._staging is None:  # given up by another fill meanwhile: host writes
                read(self.buffers(lo, hi))
                self._count(t0, t1, time.perf_counter())
                return
            copies, off = [], 0
            for spec, rb, size, dst in zip(self.layout.arrays, row_bytes, sizes, self._dst):
                # one 2-D copy per array: a run of n rows for every head, heads n_alloc rows apart
                copies.append((dst + lo * rb, self.n_alloc * rb, off, n * rb, n * rb, spec.heads))
                off += size
            try:
                staging.upload(slot, copies)
            except cuda_copy.CudaError as e:
                self._give_up_staging(e)
                read(self.buffers(lo, hi))
            self._count(t0, t1, time.perf_counter())
        finally:
            staging.give(slot)

    def _give_up_staging(self, e: Exception) -> None:
        from . import cuda_copy

        cuda_copy.disable(str(e))
        self._staging = None

    def _count(self, t0: float, t1: float, t2: float | None = None) -> None:
        with self._lock:
            self.timings["read_ms"] += (t1 - t0) * 1000
            self.timings["copy_ms"] += ((t2 or t1) - t1) * 1000
            self.timings["fills"] += 1

    def take(self) -> list[mx.array]:
        """The filled arrays (host dtypes: `install` views them back). The target lets go of
        them and their views: an array still held here (or its buffer, through a view)
        would make the first update of each layer copy the whole array instead of writing
        its new rows in place."""
        self.allocate()  # no-op unless nothing was filled
        arrays = self.arrays
        if arrays is None:  # one upload per array
            arrays = [mx.array(v) for v in self.views]
        self.views, self.arrays = [], None
        return arrays

    def install(self, cache: list, n_tokens: int) -> None:
        """Hand the filled arrays to the cache's full-attention layers, holding `n_tokens`."""
        install(cache, self.layout, self.take(), n_tokens)


# ---- host memory: arrays made while the first rows are read ---------------------------

HOST_READ = True  # read_rows where MLX's arrays are host memory; tests turn it off
# read_rows reads in C where readhash is built; "off" reads in Python (benchmarks compare the two)
NATIVE_READS = not switched_off(os.environ.get("AGENTD_NATIVE_READS"))
# unwritten_arrays from the C++ module where it is loaded; "off" uses mx.load (tests compare)
NATIVE_ARRAYS = not switched_off(os.environ.get("AGENTD_NATIVE_ARRAYS"))
GROUPS = 4  # zeroed arrays are made in this many groups, each read as soon as it exists


def host_read_usable() -> bool:
    """Whether `read_rows` may make the arrays: not on CUDA, whose arrays are not host
    memory (RowTarget stages those)."""
    from .backend import CUDA, backend

    return HOST_READ and backend() != CUDA and _cuda_staging() is None


def native_reader() -> readhash.Reader | None:
    """The C reader `read_rows` uses, or None where it reads in Python."""
    return readhash.load() if NATIVE_READS else None


def read_rows(layout: RowLayout, n_tokens: int, segments: list[Segment], submit: Callable,
              step: int = 256) -> list[mx.array]:
    """New arrays for `layout` (with a `step` of rows to spare, as RowTarget) holding
    the segments' rows, read by `submit`ted jobs (one a segment) straight into the arrays'
    own memory: in C where `readhash` is built (`_read_in_c`), else in Python
    (`_read_in_python`). Either way each segment's rows are hashed in storage order, as
    they were written, and rows past the segments' are left as the arrays were made: a
    cache reads no row past its offset. Segments are consecutive from row 0.
    Afterwards each segment's `error` says whether its rows may be used: the caller keeps
    those before the first refused one (the rest are never read: the cache's offset ends
    there). RowsError: MLX gives no writable view of its arrays here (the caller uses
    RowTarget)."""
    reader = native_reader()
    if reader is not None:
        return _read_in_c(reader, layout, rows_to_allocate(n_tokens, step), segments, submit)
    return _read_in_python(layout, rows_to_allocate(n_tokens, step), segments, submit)


def _read_in_c(reader: readhash.Reader, layout: RowLayout, n_alloc: int, segments: list[Segment],
               submit: Callable) -> list[mx.array]:
    """All arrays made unwritten, in one call (`unwritten_arrays`: the reads write every row
    once), then each segment's rows read and hashed in C, 256 KB at a time while they are in
    the CPU's cache. The arrays come first, so every job reads as soon as it starts."""
    specs = layout.arrays
    row_bytes = [s.width * getattr(mx, s.dtype).size for s in specs]
    try:
        arrays = unwritten_arrays([(1, s.heads, n_alloc, s.width) for s in specs],
                                  [_host_dtype(s.dtype) for s in specs])
        views = [_shared_view(a) for a in arrays]
    except (TypeError, ValueError, RuntimeError) as e:
        raise RowsError(f"no writable view of the arrays ({e})") from e
    # Memory MLX's allocator got anew (after an eviction gave buffers back) would fault in the
    # reads 4 KiB at a time: 8,173 tokens took 121 ms, 91 ms in huge pages (Python's path:
    # 150 ms); memory already touched is not changed.
    for v in views:
        reader.advise_huge(v.ctypes.data, v.nbytes)
    # The address of each (array, head)'s row 0 and its bytes a row, in storage order.
    heads = [(i, head) for i, s in enumerate(specs) for head in range(s.heads)]
    row0 = np.array([views[i].ctypes.data + head * n_alloc * row_bytes[i] for i, head in heads], np.uint64)
    nbytes = np.array([row_bytes[i] for i, _ in heads], np.uint64)
    del views

    def read(seg: Segment) -> None:
        chunks = np.empty((len(row0), 2), np.uint64)  # struct iovec: base, length
        chunks[:, 0] = row0 + np.uint64(seg.at) * nbytes
        chunks[:, 1] = np.uint64(seg.count) * nbytes
        state = reader.start(seg.prefix)
        try:
            status, err = reader.read(seg.fd, chunks, seg.offset, state)
        except BaseException:
            reader.drop(state)
            raise
        if status != readhash.OK:
            reader.drop(state)
            seg.error = "truncated" if status == readhash.TRUNCATED else "unreadable"
        elif reader.finish(state) != seg.checksum:
            seg.error = "checksum"

    jobs = []
    try:
        for seg in segments:
            jobs.append(submit(read, seg))
    finally:
        futures.wait(jobs)  # every read is over before the caller closes the files
    for job in jobs:
        job.result()
    return arrays


def _read_in_python(layout: RowLayout, n_alloc: int, segments: list[Segment], submit: Callable) -> list[mx.array]:
    """Zeroed arrays made in GROUPS groups of consecutive layers, and a segment's rows of a
    group, one contiguous run of its file, read (`os.preadv`) and hashed (`xxhash`) as soon
    as that group exists, while this thread is still making the later ones."""
    specs = layout.arrays
    k = -(-len(specs) // GROUPS)
    groups = [range(g, min(g + k, len(specs))) for g in range(0, len(specs), k)]
    row_bytes = [s.width * getattr(mx, s.dtype).size for s in specs]
    group_bytes = [sum(specs[i].heads * row_bytes[i] for i in members) for members in groups]  # of one row
    views: list[np.ndarray | None] = [None] * len(specs)
    ready = [threading.Event() for _ in groups]
    failed = []

    def read(seg: Segment) -> None:
        h = xxhash.xxh3_128(seg.prefix)
        pos = seg.offset
        try:
            for g in range(len(groups)):
                ready[g].wait()
                if failed:
                    return
                rows = [memoryview(views[i][0, head, seg.at:seg.at + seg.count, :]).cast("B")
                        for i in groups[g] for head in range(specs[i].heads)]
                read_buffers(seg.fd, rows, pos)
                for r in rows:
                    h.update(r)
                pos += group_bytes[g] * seg.count
        except RowsError:
            seg.error = "truncated"
        except OSError:
            seg.error = "unreadable"
        else:
            if h.hexdigest() != seg.checksum:
                seg.error = "checksum"

    jobs = [submit(read, seg) for seg in segments]
    arrays: list[mx.array] = []
    streams = _zeroing_streams()
    try:
        for g, members in enumerate(groups):
            made = [mx.zeros((1, specs[i].heads, n_alloc, specs[i].width), dtype=getattr(mx, _host_dtype(specs[i].dtype)),
                             stream=streams[j % len(streams)]) for j, i in enumerate(members)]
            mx.eval(made)
            for i, a in zip(members, made):
                views[i] = _shared_view(a)
            arrays += made
            ready[g].set()
    except (TypeError, ValueError, RuntimeError) as e:
        failed.append(e)
        raise RowsError(f"no writable view of the arrays ({e})") from e
    finally:
        for event in ready:
            event.set()  # a failure above: the jobs stop instead of waiting forever
        futures.wait(jobs)
    for job in jobs:
        job.result()
    return arrays


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "uint16": "U16", "uint32": "U32"}


class _HeaderOnly(io.RawIOBase):
    """A safetensors file of `header` and no data: every read past the header is reported
    done and writes nothing."""

    def __init__(self, header: bytes, size: int):
        self._header, self._size, self._pos = header, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset + (0, self._pos, self._size)[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = len(buffer)
        if self._pos < len(self._header):
            n = min(n, len(self._header) - self._pos)
            memoryview(buffer).cast("B")[:n] = self._header[self._pos:self._pos + n]
        self._pos += n
        return n


def unwritten_arrays(shapes: list[tuple[int, ...]], dtypes: list[str]) -> list[mx.array]:
    """Evaluated arrays whose memory nothing has written, for the reads to write once
    (`mx.zeros` writes them first: 60 arrays of 6.5 MB in 21 ms, as long as a memcpy of them).
    From agentd's C++ module where it is loaded (`graph_kernels.unwritten`: a malloc from
    MLX's allocator each, 60 in 0.1 ms), else `mx.load` of a safetensors file whose data
    reads write nothing: MLX reads each tensor straight into its new array's memory (MLX
    0.32 on the CPU), so they come back holding whatever the allocator had there, at ~70 us
    an array (4.3 ms of a 12 ms restore at 2,029 tokens)."""
    native = graph_kernels.loaded() if NATIVE_ARRAYS else None
    if native is not None:
        mx_dtypes = [getattr(mx, d) for d in dtypes]
        arrays = native.unwritten([list(s) for s in shapes], mx_dtypes)
        # The reads write through raw addresses: arrays of another shape must not reach them.
        if [(a.shape, a.dtype) for a in arrays] != [(tuple(s), d) for s, d in zip(shapes, mx_dtypes)]:
            raise ValueError("the C++ module made arrays of other shapes")
        return arrays
    header, at = {}, 0
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        size = int(np.prod(shape)) * getattr(mx, dtype).size
        header[str(i)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    loaded = mx.load(_HeaderOnly(head, len(head) + at), format="safetensors")
    arrays = [loaded[str(i)] for i in range(len(shapes))]
    mx.eval(arrays)
    return arrays


_ZEROING_STREAMS: list | None = None


def _zeroing_streams() -> list:
    """The streams `read_rows` zeroes new arrays on: on MLX's CPU backend two (made once,
    on the MLX thread, the only caller), since each stream's work runs on one thread and
    zeroing new memory is mostly page faults, which two cores take in parallel."""
    global _ZEROING_STREAMS
    if _ZEROING_STREAMS is None:
        device = mx.default_device()
        _ZEROING_STREAMS = [mx.default_stream(device)]
        if device == mx.cpu:
            _ZEROING_STREAMS.append(mx.new_stream(device))
    return _ZEROING_STREAMS


def _cuda_staging():
    """The CUDA staging pool when MLX computes on CUDA and its runtime is usable, else None."""
    from .backend import CUDA, backend

    if backend() != CUDA:
        return None
    from . import cuda_copy

    return cuda_copy.staging()
