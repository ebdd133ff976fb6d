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
