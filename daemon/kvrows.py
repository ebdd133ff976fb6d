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
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import xxhash
from mlx_lm.models import cache as C

# Layers whose rows are a pure function of the token prefix: stored in shared blocks.
ROW_CLASSES = (C.KVCache, C.QuantizedKVCache)
DTYPES = ("float32", "float16", "bfloat16", "uint32")
IOV_BATCH = 512  # below every platform's IOV_MAX (1024 on Linux and macOS)


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


def host_dtype(name: str) -> str:
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


class RowTarget:
    """Full-attention arrays allocated at their final size, filled in place by reads.

    `n_alloc` rounds up to mlx-lm's 256-token step, so the next turn's tokens go into rows
    already there instead of a grow-and-copy of the whole cache. Where MLX's arrays are
    host memory it can export (CPU, Apple unified memory) reads land in them directly;
    elsewhere (a discrete GPU) they land in host arrays, uploaded once by `install`.
    """

    def __init__(self, layout: RowLayout, n_tokens: int, step: int = 256):
        self.layout = layout
        self.n_alloc = max(step, -(-n_tokens // step) * step)
        self.arrays: list[mx.array] | None = []
        for spec in layout.arrays:
            # Zeroed on the default stream. On CUDA that is a GPU kernel, and the host's
            # reads then fill managed pages the GPU holds; measured on an H200 (gpu.py split,
            # 1.07 GB) that is still the fastest: zeros 0.002 s + fill 0.11 s + first GPU
            # pass 0.09 s, against 0.37 + 0.05 + 0.10 s zeroed on the CPU stream.
            self.arrays.append(mx.zeros((1, spec.heads, self.n_alloc, spec.width), dtype=getattr(mx, spec.dtype)))
        mx.eval(self.arrays)
        try:
            self.views = [_shared_view(a) for a in self.arrays]
        except (TypeError, ValueError, RuntimeError):
            self.arrays = None  # staged on the host instead
            self.views = [np.zeros((1, s.heads, self.n_alloc, s.width), dtype=host_dtype(s.dtype))
                          for s in layout.arrays]

    def buffers(self, lo: int, hi: int) -> list[memoryview]:
        return row_buffers(self.views, lo, hi)

    def install(self, cache: list, n_tokens: int) -> None:
        """Hand the filled arrays to the cache's full-attention layers, holding `n_tokens`."""
        arrays = self.arrays
        if arrays is None:  # one upload per array
            arrays = [mx.array(v).view(getattr(mx, s.dtype)) for v, s in zip(self.views, self.layout.arrays)]
        it = iter(arrays)
        for i in self.layout.layers:
            layer = cache[i]
            if type(layer) is C.QuantizedKVCache:
                layer.keys = (next(it), next(it), next(it))
                layer.values = (next(it), next(it), next(it))
            else:
                layer.keys, layer.values = next(it), next(it)
            layer.offset = n_tokens
        self.views = []  # drop the numpy views: the cache owns the memory now

