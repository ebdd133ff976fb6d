"""Token rows of full-attention KV caches, moved between mlx-lm cache objects and files
without intermediate copies.

A full-attention layer (`KVCache`, or `QuantizedKVCache` under `--kv-bits`) keeps arrays of
shape (1, heads, tokens, width): keys and values, or their quantized triples. For one run
of tokens [lo, hi) each array contributes one contiguous chunk per head, so a run of rows is
a list of buffers that `os.writev` writes and `os.preadv` reads straight into a cache
allocated at its final size: the file's bytes reach the cache in one copy, and the checksum
(xxh3-128, faster than memory copy) reads them once more.

`RowLayout` names the arrays; it is part of every block's header and every manifest, so a
file is only read into caches laid out exactly as it was written.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np
import xxhash
from mlx_lm.models import cache as C

# Layers whose rows are a pure function of the token prefix: stored in shared blocks.
ROW_CLASSES = (C.KVCache, C.QuantizedKVCache)
DTYPES = ("float32", "float16", "bfloat16", "uint32")
IOV_BATCH = 512  # below every platform's IOV_MAX (1024 on Linux and macOS)
# On CUDA, make a restore's arrays while its first blocks are read (RowTarget.allocate);
# "0" makes them first, as before (env: benchmarks/gpu.py restore compares the two).
OVERLAP_ARRAYS = os.environ.get("AGENTD_RESTORE_OVERLAP", "1").strip() != "0"
ARRAYS_WAIT_S = 600.0  # a read thread's wait for them: far beyond any restore, short of forever


class RowsError(Exception):
    """Rows that do not match the layout or their checksum; never used."""


@dataclass(frozen=True)
class ArraySpec:
    layer: int
    heads: int
    width: int
    dtype: str  # mlx dtype name: "float32", "float16", "bfloat16", "uint32"


@dataclass(frozen=True)
class RowLayout:
    """The per-token arrays of a cache's full-attention layers, in storage order."""

    arrays: tuple[ArraySpec, ...]

    @property
    def layers(self) -> list[int]:
        return sorted({a.layer for a in self.arrays})

    def row_bytes(self) -> int:
        return sum(a.heads * a.width * getattr(mx, a.dtype).size for a in self.arrays)

    def to_json(self) -> list:
        return [[a.layer, a.heads, a.width, a.dtype] for a in self.arrays]

    @classmethod
    def from_json(cls, data) -> "RowLayout":
        try:
            specs = tuple(ArraySpec(int(l), int(h), int(w), str(d)) for l, h, w, d in data)
        except (TypeError, ValueError) as e:
            raise RowsError(f"unreadable row layout ({e})") from e
        if any(s.dtype not in DTYPES for s in specs):
            raise RowsError("row layout names an unknown dtype")
        return cls(specs)


def is_row_layer(layer) -> bool:
    return type(layer) in ROW_CLASSES


def _layer_arrays(layer) -> list[mx.array]:
    if type(layer) is C.QuantizedKVCache:
        return [*layer.keys, *layer.values]
    return [layer.keys, layer.values]


def _dtype_name(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def _numpy_view(a: mx.array) -> np.ndarray:
    """The evaluated array's own memory as numpy (bfloat16, unknown to numpy, as uint16).

    Zero-copy where MLX exports its buffer (CPU, Apple unified memory); elsewhere a host copy.
    """
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
        mx.eval(a)
    try:
        return np.asarray(memoryview(a))
    except (TypeError, ValueError, RuntimeError):
        return np.array(a)


def _shared_view(a: mx.array) -> np.ndarray:
    """A writable numpy view of the array's own memory; raises where MLX cannot export it."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
        mx.eval(a)
    view = np.asarray(memoryview(a))
    if not view.flags.writeable:
        raise ValueError("read-only buffer")
    return view


def _host_dtype(name: str) -> str:
    return "uint16" if name == "bfloat16" else name


def layout_of(cache: list) -> RowLayout | None:
    """The row layout of a cache whose full-attention layers hold at least one token."""
    specs = []
    for i, layer in enumerate(cache):
        if not is_row_layer(layer):
            continue
        if layer.keys is None:
            return None
        for a in _layer_arrays(layer):
            specs.append(ArraySpec(i, a.shape[1], a.shape[3], _dtype_name(a)))
    return RowLayout(tuple(specs))


def _views(cache: list, layout: RowLayout) -> list[np.ndarray]:
    """Zero-copy numpy views of the cache's row arrays, in layout order (evaluated first)."""
    arrays = [a for i in layout.layers for a in _layer_arrays(cache[i])]
    mx.eval(arrays)
    views = [_numpy_view(a) for a in arrays]
    if len(views) != len(layout.arrays):
        raise RowsError("the cache does not have the layout it is stored under")
    for spec, a, v in zip(layout.arrays, arrays, views):
        if a.shape[1] != spec.heads or a.shape[3] != spec.width or _dtype_name(a) != spec.dtype:
            raise RowsError("the cache does not have the layout it is stored under")
    return views


def row_buffers(views: list[np.ndarray], lo: int, hi: int) -> list[memoryview]:
    """Rows [lo, hi) as contiguous per-head chunks, array by array: the storage order."""
    out = []
    for v in views:
        for h in range(v.shape[1]):
            out.append(memoryview(v[0, h, lo:hi, :]).cast("B"))
    return out


def cache_row_buffers(cache: list, layout: RowLayout, lo: int, hi: int) -> list[memoryview]:
    return row_buffers(_views(cache, layout), lo, hi)


def digest(buffers: list[memoryview], prefix: bytes = b"") -> str:
    h = xxhash.xxh3_128(prefix)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def segment_digest(buffers: list[memoryview], at: int, count: int) -> str:
    """The checksum of a tail or block segment: rows `[at, at + count)`, their position included."""
    return digest(buffers, f"{at}:{count}".encode())


def nbytes(buffers: list[memoryview]) -> int:
    return sum(b.nbytes for b in buffers)


def write_buffers(fd: int, buffers: list, offset: int | None = None) -> int:
    """Write every buffer, in order, at `offset` (or the file position); returns bytes written."""
    total = 0
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch = pending[:IOV_BATCH]
        n = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset + total)
        total += n
        # A short write (rare: signals, quotas) resumes where it stopped.
        while batch and n >= batch[0].nbytes:
            n -= batch[0].nbytes
            batch.pop(0)
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total


def read_buffers(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fill every buffer from the file at `offset`; a short file is RowsError('truncated')."""
    pending = [b for b in buffers if b.nbytes]
    pos = offset
    while pending:
        batch = pending[:IOV_BATCH]
        n = os.preadv(fd, batch, pos)
        if n == 0:
            raise RowsError("truncated")
        pos += n
        while batch and n >= batch[0].nbytes:
            n -= batch[0].nbytes
            batch.pop(0)
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


@dataclass
class Segment:
    """Rows `[at, at + count)` of an open file `fd`, stored from `offset` in storage order,
    whose xxh3-128 seeded with `prefix` must be `checksum`. Reading sets `error`
    (`truncated`, `unreadable`, `checksum`) when they must not be used."""

    fd: int
    at: int
    count: int
    offset: int
    checksum: str
    prefix: bytes
    error: str | None = None


def read_segment(seg: Segment, buffers: list[memoryview]) -> None:
    """Fill `buffers` (the segment's rows in storage order) and check them; RowsError(reason)."""
    try:
        read_buffers(seg.fd, buffers, seg.offset)
    except OSError as e:
        raise RowsError("unreadable") from e
    if digest(buffers, seg.prefix) != seg.checksum:
        raise RowsError("checksum")


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


def install(cache: list, layout: RowLayout, arrays: list[mx.array], n_tokens: int) -> None:
    """Give the cache's full-attention layers `arrays` (layout order; bfloat16 may come as
    uint16, viewed back without a copy), holding `n_tokens`."""
    arrays = [a if a.dtype == getattr(mx, s.dtype) else a.view(getattr(mx, s.dtype))
              for a, s in zip(arrays, layout.arrays)]
    it = iter(arrays)
    for i in layout.layers:
        layer = cache[i]
        if type(layer) is C.QuantizedKVCache:
            layer.keys = (next(it), next(it), next(it))
            layer.values = (next(it), next(it), next(it))
        else:
            layer.keys, layer.values = next(it), next(it)
        layer.offset = n_tokens


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
