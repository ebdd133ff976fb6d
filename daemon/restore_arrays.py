"""The arrays a restore fills: made at their final size, where the reads can reach them.

`read_rows` (CPU, Apple unified memory): MLX's arrays are host memory; they are made in
groups while the read threads already read and hash each segment's rows of the groups made
so far straight into them. `RowTarget` (everywhere else): arrays allocated first and filled
by `fill`; on CUDA each block goes to a pinned slot, is checked there, and the copy engine
moves it into GPU arrays (`cuda_copy`). Both leave one of mlx-lm's 256-row steps to spare
(`rows_to_allocate`). `restore_reads` drives them; `kvrows` has the layout and the row I/O.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import mlx.core as mx
import numpy as np
import xxhash

from .kvrows import RowLayout, RowsError, Segment, _host_dtype, _shared_view, install, read_buffers, row_buffers

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
GROUPS = 4  # the arrays are made in this many groups, each read as soon as it exists


def host_read_usable() -> bool:
    """Whether `read_rows` may make the arrays: not on CUDA, whose arrays are not host
    memory (RowTarget stages those)."""
    from .backend import CUDA, backend

    return HOST_READ and backend() != CUDA and _cuda_staging() is None


def read_rows(layout: RowLayout, n_tokens: int, segments: list[Segment], submit: Callable,
              step: int = 256) -> list[mx.array]:
    """New arrays for `layout` (with a `step` of rows to spare, as RowTarget) holding
    the segments' rows, read by `submit`ted jobs (one a segment) straight into the arrays'
    own memory while this thread is still making the later arrays: the arrays are made
    (zeroed) in GROUPS groups of consecutive layers, and a segment's rows of a group, one
    contiguous run of its file, are read and hashed as soon as that group exists, in
    storage order, so the hash sees them as they were written and reads them in the CPU's
    cache. Segments are consecutive from row 0. Afterwards each segment's `error` says
    whether its rows may be used: the caller keeps those before the first refused one
    (the rest are never read: the cache's offset ends there). RowsError: MLX gives no
    writable view of its arrays here (the caller uses RowTarget)."""
    n_alloc = rows_to_allocate(n_tokens, step)
    specs = layout.arrays
    k = -(-len(specs) // GROUPS)
    groups = [range(g, min(g + k, len(specs))) for g in range(0, len(specs), k)]
    row_bytes = [s.width * getattr(mx, s.dtype).size for s in specs]
    views: list[np.ndarray | None] = [None] * len(specs)
    ready = [threading.Event() for _ in groups]
    failed = []

    def read(seg: Segment) -> None:
        h, pos = xxhash.xxh3_128(seg.prefix), seg.offset
        try:
            for g, members in enumerate(groups):
                ready[g].wait()
                if failed:
                    return
                rows = [memoryview(views[i][0, head, seg.at:seg.at + seg.count, :]).cast("B")
                        for i in members for head in range(specs[i].heads)]
                read_buffers(seg.fd, rows, pos)
                for r in rows:
                    h.update(r)
                pos += sum(specs[i].heads * seg.count * row_bytes[i] for i in members)
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
                             stream=streams[j % len(streams)])
                    for j, i in enumerate(members)]
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
        for job in jobs:
            job.result()
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
