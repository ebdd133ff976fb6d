"""Attention for short prefills on CUDA, composed of two matrix products and a softmax.

MLX's CUDA backend runs attention over more than one query row through cuDNN, which builds
an execution plan for every new pair of (query rows, key rows) it meets. A resumed turn's
prefill always is a new pair: its own length, at a context length no pass had before. On
an H200 the plan cost 50-70 ms of a ~100 ms follow-up prefill of 8-128 tokens at 9k and
33k tokens of context (the same pass again, plan cached: 21-44 ms; benchmarks/gpu_turn.py).
For that few query rows the plain computation -- scores = q k^T, softmax, times v, as MLX's
own fallback writes it -- reads the keys and values once and its scores take at most
`MAX_SCORE_BYTES`, with nothing to plan. Long chunks (a first turn's 2,048-token pieces)
and single-row decode steps (MLX's own vector kernel, no cuDNN) keep MLX's path.

`install` replaces `mx.fast.scaled_dot_product_attention`, which mlx-lm's models all call
(mlx_lm.models.base), with a dispatcher; agentd.device calls it on CUDA only.
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx

MAX_QUERY_ROWS = int(os.environ.get("AGENTD_SHORT_ATTENTION_ROWS", "256"))  # env: 0 turns it off (gpu_turn.py)
MAX_SCORE_BYTES = 1 << 30  # float32 scores of one layer's pass; beyond it cuDNN's fused kernel


def composed(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(scale * q k^T + mask) v for q (B, Hq, L, D) and k, v (B, Hk, S, D), Hq a
    multiple of Hk (grouped-query heads), as `mx.fast.scaled_dot_product_attention`
    defines it: a "causal" mask aligns the last query row with the last key; an array
    mask (broadcastable to (B, Hq, L, S)) is boolean (True: may attend) or additive."""
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = Hq // Hk
    q = q * mx.array(scale, dtype=q.dtype)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    # The score products run far slower for some row counts than for the power of two
    # above them (H200, 33k keys: 83 rows 94-98 ms a pass, 128 rows 53-55 ms), so the
    # query rows are padded to one; the padded rows see every key and are dropped.
    Lp = padded_rows(L)
    if Lp != L:
        q = mx.concatenate([q, mx.zeros((B, Hq, Lp - L, D), dtype=q.dtype)], axis=2)
        if mask is not None and mask.shape[-2] == L:
            fill = mx.ones if mask.dtype == mx.bool_ else mx.zeros
            mask = mx.concatenate([mask, fill((*mask.shape[:-2], Lp - L, mask.shape[-1]), dtype=mask.dtype)], axis=-2)
    out = _attend(q, k, v, mask, rep)
    return out[:, :, :L] if Lp != L else out


def _attend(q: mx.array, k: mx.array, v: mx.array, mask, rep: int) -> mx.array:
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if rep > 1:  # each group of `rep` query heads shares one key/value head
        q = q.reshape(B, Hk, rep, L, D)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)
    if mask is not None:
        if rep > 1 and mask.ndim >= 3:
            mask = (mx.expand_dims(mask, -3) if mask.shape[-3] == 1
                    else mask.reshape(*mask.shape[:-3], Hk, rep, *mask.shape[-2:]))
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask.astype(scores.dtype)
    out = mx.softmax(scores, axis=-1, precise=True) @ v
    return out.reshape(B, Hq, L, D) if rep > 1 else out


def short_enough(q: mx.array, k: mx.array) -> bool:
    """Whether a pass takes the composed path: 2 to MAX_QUERY_ROWS query rows, scores
    within MAX_SCORE_BYTES."""
    B, Hq, L, _ = q.shape
    return 1 < L <= MAX_QUERY_ROWS and B * Hq * padded_rows(L) * k.shape[2] * 4 <= MAX_SCORE_BYTES


def padded_rows(L: int) -> int:
    return max(8, 1 << (L - 1).bit_length())


def dispatcher(fused: Callable) -> Callable:
    """`fused` (MLX's function) for what it does without planning, `composed` for the rest."""

    def scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
        if sinks is None and not kwargs and short_enough(q, k):
            return composed(q, k, v, scale, mask)
        if sinks is not None:
            kwargs["sinks"] = sinks
        return fused(q, k, v, scale=scale, mask=mask, **kwargs)

    scaled_dot_product_attention.fused = fused
    return scaled_dot_product_attention


def install() -> bool:
    """Route MLX's attention through the dispatcher (once). Returns whether it is on."""
    current = mx.fast.scaled_dot_product_attention
    if MAX_QUERY_ROWS <= 1:
        return False
    if getattr(current, "fused", None) is None:
        mx.fast.scaled_dot_product_attention = dispatcher(current)
    return True
