"""Few-row attention and SwiGLU on the CPU: agentd's kernels in place of MLX's for few rows.

MLX's CPU backend computes `mx.fast.scaled_dot_product_attention` as a product, a softmax
and a product, and its `exp` runs one element at a time (~13.5 ns each): the 22-token
follow-up of a resumed agent at 685 tokens of context spent ~100 of ~200 ms in attention,
and ~20 more in the MLP's SwiGLU (`silu(gate) * up`, an `exp` per element too).
`agentd_attention` in `gemv_forward.c` (the few-row library the daemon preloads) does QK^T,
a vectorised softmax and PV per KV head and tile of query rows, and `agentd_swiglu` the
activation with the same vectorised `exp`, on the same threads as the few-row products.

When `agentd.graph_kernels` loads (its C++ module, built once), the same kernels run as nodes
of MLX's graph instead, without those evaluations: then they take decode steps too (one query
row per sequence, batched or not) and SwiGLU of 1 to `MAX_QUERY_ROWS` rows. The ctypes path
below is what runs without it.

`install(model)` puts `attention` where mlx-lm's model modules call
`scaled_dot_product_attention` (each imports it from `mlx_lm.models.base`) and `swiglu`
where they call mlx-lm's `swiglu`. `attention` takes float32 calls of `MIN_QUERY_ROWS` to
`MAX_QUERY_ROWS` query rows over plain (unquantized) caches, with no mask, "causal", or an
array mask; `swiglu` float32 calls of `SWIGLU_MIN_ROWS` to `MAX_QUERY_ROWS` rows. A batched
decode step (one query row for each of several sequences) goes to mlx-lm's attention split in
two, part of the sequences on a second CPU stream and each part from its rows' first unpadded
key (`split_decode_attention`), so that its softmax runs on both cores. Everything else -- one sequence's decode step, long prefill chunks,
quantized caches, attention sinks -- goes to mlx-lm's functions unchanged. Each kernel call evaluates its inputs (the kernels read them from
memory), so a forward pass of 8-32 rows becomes two MLX evaluations per layer instead of
one in all: ~60 round trips of about 0.1 ms on the default model. Benchmarks set
`MAX_QUERY_ROWS = 0` to compare with MLX's path in one process.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from . import graph_kernels
from .switches import switched_off

# A resumed turn's short prefill (and any prompt's last chunk that short); prefill chunks (256
# rows on the CPU) keep MLX's attention. The same bound as the few-row products.
MAX_QUERY_ROWS = 32
# Decode steps (one row per sequence, batched or not) keep MLX's too: its attention of one row
# costs about what the 30 evaluations the kernel needs do (on a busy machine, more).
MIN_QUERY_ROWS = 2
ENV_SWITCH = "AGENTD_FEW_ATTENTION"  # "off": MLX's attention everywhere
# A batched decode step's attention: MLX's, its sequences split over two CPU streams
# (`split_decode_attention`). "off" keeps it on one (benchmarks compare the two).
SPLIT_DECODE = not switched_off(os.environ.get("AGENTD_SPLIT_DECODE"))
_MASK_NONE, _MASK_CAUSAL, _MASK_BOOL, _MASK_ADD = 0, 1, 2, 3

# SwiGLU (llama-style MLPs) of this many rows up to MAX_QUERY_ROWS runs in the library too. Below
# it MLX's is faster: the evaluation the call needs (~0.1 ms) costs more than its exp of a few rows.
SWIGLU_MIN_ROWS = 8

_lib: ctypes.CDLL | None = None
_graph = None  # agentd.graph_kernels' module, bound to _lib's kernels, when it loads
graph_unavailable = ""  # why it did not, for the start-up log
_mlx_attention = None  # mlx-lm's scaled_dot_product_attention, kept for everything else
_mlx_swiglu = None  # mlx-lm's swiglu (mlx_lm.models.activations), likewise
_Strides = ctypes.c_longlong * 3
_MaskStrides = ctypes.c_longlong * 4


def load(path: str | Path | None = None) -> bool:
    """Bind `agentd_attention` from the few-row library (the preloaded one by default: the
    same threads as the products); True when bound."""
    global _lib
    if _lib is not None:
        return True
    if path is None:
        from . import blas

        path = _mapped(blas.FORWARD_STEM)
        if path is None:
            return False
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.agentd_attention
    except (OSError, AttributeError):
        return False
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i, i, i, i, i, i, i, p, p, p, p, p, p, ctypes.c_float, i, p, p, p]
    fn.restype = i
    lib.agentd_swiglu.argtypes = [ctypes.c_longlong, p, p, p]
    lib.agentd_swiglu.restype = None
    _lib = lib
    return True


def _mapped(stem: str) -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((line.rsplit(" ", 1)[-1] for line in maps.splitlines() if stem in line), None)


def install(model) -> bool:
    """Route the attention of `model`'s modules through `attention`; True if the kernel is
    bound and at least one module calls mlx-lm's function. Affects every model of those
    modules in this process (a module global is replaced), which `attention` allows for:
    what it does not take goes to mlx-lm's function."""
    global _mlx_attention
    if switched_off(os.environ.get(ENV_SWITCH)) or not load():
        return False
    import sys

    from mlx_lm.models import base

    from mlx_lm.models import activations

    global _mlx_swiglu, _graph, graph_unavailable
    if _graph is None and not switched_off(os.environ.get(graph_kernels.ENV_SWITCH)):
        address = ctypes.cast(_lib.agentd_attention, ctypes.c_void_p).value
        _graph, graph_unavailable = graph_kernels.load(address, ctypes.cast(_lib.agentd_swiglu, ctypes.c_void_p).value)
    elif _graph is None:
        graph_unavailable = f"switched off ({graph_kernels.ENV_SWITCH})"
    if _mlx_attention is None:
        _mlx_attention = base.scaled_dot_product_attention
    if _mlx_swiglu is None:
        _mlx_swiglu = activations.swiglu
    names = {type(m).__module__ for m in model.modules()} | {type(model).__module__}
    patched = 0
    for name in names:
        module = sys.modules.get(name)
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is _mlx_attention or current is attention:
            module.scaled_dot_product_attention = attention
            patched += 1
        if getattr(module, "swiglu", None) in (_mlx_swiglu, swiglu):
            module.swiglu = swiglu
    return patched > 0


def mode() -> str:
    """What `attention` and `swiglu` run on: "graph" (the kernels as MLX graph nodes), "agentd"
    (the kernels through ctypes) or "mlx" (mlx-lm's functions)."""
    return "graph" if _graph is not None else "agentd" if _lib is not None else "mlx"


def attention(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, through agentd's kernel when it takes the call."""
    takes = (
        sinks is None
        and not hasattr(cache, "bits")
        and _lib is not None
        and isinstance(keys, mx.array)
        and queries.ndim == 4
        and 1 <= queries.shape[2] <= MAX_QUERY_ROWS
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and (mask is None or isinstance(mask, mx.array) or (isinstance(mask, str) and mask == "causal"))
    )
    if takes and _graph is not None:
        out = graph_attention(queries, keys, values, cache, scale, mask)
        if out is not None:
            return out
    elif takes and queries.shape[2] >= MIN_QUERY_ROWS:
        out = few_row_attention(queries, keys, values, scale, mask)
        if out is not None:
            return out
    if (SPLIT_DECODE and sinks is None and not hasattr(cache, "bits") and isinstance(keys, mx.array)
            and queries.ndim == 4 and queries.shape[0] >= 2 and queries.shape[2] == 1
            and mx.default_device() == mx.cpu):
        return split_decode_attention(queries, keys, values, cache, scale, mask)
    return _mlx_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def graph_attention(queries, keys, values, cache, scale: float, mask) -> mx.array | None:
    """softmax(scale Q K^T + mask) V by agentd's kernel as a node of MLX's graph; None for
    shapes the kernel does not take (a mask that does not broadcast, say). Over a batch
    cache's left-padded rows it starts at the first key any row attends: the keys before are
    masked in every row, and a masked key's weight is exactly 0, so a row's result is the same
    bits with them or without (the kernel sums each lane's keys in order)."""
    if mask is None:
        kind = _MASK_NONE
    elif isinstance(mask, str):
        kind, mask = _MASK_CAUSAL, None
    else:
        kind = _MASK_BOOL if mask.dtype == mx.bool_ else _MASK_ADD
        length = keys.shape[2]
        if type(cache) is BatchKVCache and mask.shape[-1] == length and keys.shape[0] > 1:
            first = min(cache.left_padding.tolist())
            if 0 < first < length:
                keys, values, mask = keys[:, :, first:], values[:, :, first:], mask[..., first:]
    try:
        return _graph.attention(queries, keys, values, float(scale), kind, mask)
    except ValueError:
        return None


def split_decode_attention(queries, keys, values, cache, scale: float, mask) -> mx.array:
    """MLX's attention of a batched decode step (one query row per sequence), its sequences
    split between the default stream and a second CPU stream: each stream's work runs on one
    thread, so the two parts' softmaxes (MLX's `exp`, one element at a time) run on both
    cores, where the whole step's small ops otherwise run on one. Over a batch cache's
    left-padded rows each part reads its keys from its rows' first unpadded position on (an
    agent much shorter than the others otherwise attends over all their length), and the
    split is where the two parts' keys come closest to even. A row's result is the one MLX
    gives the whole batch, bit for bit: the keys left out are masked ones, whose weights are
    exactly 0."""
    B, L = queries.shape[0], keys.shape[2]
    # Row b's keys are [pads[b], L) in mlx-lm's BatchKVCache (exactly that class: a rotating
    # one lays its rows out otherwise), and its mask masks the padding.
    padded = type(cache) is BatchKVCache and isinstance(mask, mx.array) and keys.shape[0] == B
    pads = cache.left_padding.tolist() if padded else [0] * B
    starts = [min(pads[:h]) for h in range(1, B + 1)]  # first key of rows [0, h)
    ends = [min(pads[h:]) for h in range(B)]  # first key of rows [h, B)
    cut = min(range(1, B), key=lambda h: max(h * (L - starts[h - 1]), (B - h) * (L - ends[h])))

    def rows(lo: int, hi: int, first: int) -> mx.array:
        m = mask
        if isinstance(m, mx.array) and m.ndim == 4:
            m = m[lo:hi] if m.shape[0] == B else m
            m = m[..., first:] if m.shape[-1] == L else m
        return _mlx_attention(queries[lo:hi], keys[lo:hi, :, first:], values[lo:hi, :, first:], cache,
                              scale=scale, mask=m)

    with mx.stream(_second_stream()):
        later = rows(cut, B, ends[cut])
    return mx.concatenate([rows(0, cut, starts[cut - 1]), later], axis=0)


_SECOND_STREAM = None


def _second_stream():
    """A second CPU stream for `split_decode_attention` (made once, on the MLX thread)."""
    global _SECOND_STREAM
    if _SECOND_STREAM is None:
        _SECOND_STREAM = mx.new_stream(mx.cpu)
    return _SECOND_STREAM


def _dense_last(a: np.ndarray) -> np.ndarray:
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def few_row_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask=None) -> mx.array | None:
    """softmax(scale Q K^T + mask) V by agentd's kernel, shape (B, Hq, Lq, Dv) as MLX's; None
    when the kernel refuses the shapes. Evaluates its inputs."""
    B, hq, lq, d = queries.shape
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[0] != B or keys.shape[-1] != d:
        return None
    hkv, lk, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    if values.shape[:3] != keys.shape[:3] or hq % hkv:
        return None
    mask_array = mask if isinstance(mask, mx.array) else None
    mx.eval(queries, keys, values, *([mask_array] if mask_array is not None else []))
    q, k, v = (_dense_last(np.asarray(a)) for a in (queries, keys, values))
    kind, mask_ptr, mask_strides, mask_np = _MASK_NONE, None, None, None
    if isinstance(mask, str):
        kind = _MASK_CAUSAL
    elif mask_array is not None:
        m = np.asarray(mask_array)
        if m.dtype == np.bool_:
            kind = _MASK_BOOL
        else:
            kind, m = _MASK_ADD, m.astype(np.float32, copy=False)
        try:
            mask_np = np.broadcast_to(m, (B, hq, lq, lk))
        except ValueError:
            return None
        mask_ptr = mask_np.ctypes.data
        mask_strides = _MaskStrides(*(s // mask_np.itemsize for s in mask_np.strides))
    out = np.empty((B, lq, hq, dv), np.float32)
    rc = _lib.agentd_attention(
        B, hq, hkv, lq, lk, d, dv,
        q.ctypes.data, _Strides(*(s // 4 for s in q.strides[:3])),
        k.ctypes.data, _Strides(*(s // 4 for s in k.strides[:3])),
        v.ctypes.data, _Strides(*(s // 4 for s in v.strides[:3])),
        float(scale), kind, mask_ptr, mask_strides, out.ctypes.data,
    )
    if rc != 0:
        return None
    return mx.array(out).transpose(0, 2, 1, 3)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu` (silu(gate) * x), through agentd's kernel for SWIGLU_MIN_ROWS to
    MAX_QUERY_ROWS rows of float32; evaluates its inputs then."""
    rows = gate.size // gate.shape[-1] if gate.ndim else 0
    if _graph is not None and 1 <= rows <= MAX_QUERY_ROWS and gate.dtype == x.dtype == mx.float32 and gate.shape == x.shape:
        return _graph.swiglu(gate, x)
    if (
        _lib is not None
        and SWIGLU_MIN_ROWS <= rows <= MAX_QUERY_ROWS
        and gate.dtype == x.dtype == mx.float32
        and gate.shape == x.shape
    ):
        mx.eval(gate, x)
        g, u = (np.ascontiguousarray(np.asarray(a)) for a in (gate, x))
        out = np.empty(g.shape, np.float32)
        _lib.agentd_swiglu(g.size, g.ctypes.data, u.ctypes.data, out.ctypes.data)
        return mx.array(out)
    return _mlx_swiglu(gate, x)
