"""What the few-row kernel tests share (test_fewattn.py, test_graph_kernels.py): the kernel
library built into a test's own folder and loaded as the daemon loads it, and attention
inputs shaped as a model and its cache make them."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import activations, base

from agentd import blas, fewattn


def load_kernels(folder):
    """Build the few-row library into `folder` and load it into `fewattn`, with mlx-lm's own
    functions kept for the calls the kernels do not take (what `fewattn.install` keeps)."""
    built = blas.build_gemv_forward(folder)
    assert built and fewattn.load(built)
    if fewattn._mlx_attention is None:
        fewattn._mlx_attention = base.scaled_dot_product_attention
    if fewattn._mlx_swiglu is None:
        fewattn._mlx_swiglu = activations.swiglu
    return fewattn


def attention_inputs(B, hq, hkv, lq, lk, d, dv, seed=0):
    """Queries (B, hq, lq, d) and keys and values (B, hkv, lk, d|dv), random."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    # Keys and values as a cache holds them: a view of the first lk rows of a longer buffer.
    keys = mx.random.normal((B, hkv, lk + 37, d), key=k1)[:, :, :lk, :]
    values = mx.random.normal((B, hkv, lk + 37, dv), key=k2)[:, :, :lk, :]
    # Queries as the model makes them: (B, L, H, D) transposed to (B, H, L, D).
    queries = mx.random.normal((B, lq, hq, d), key=k3).transpose(0, 2, 1, 3)
    return queries, keys, values
