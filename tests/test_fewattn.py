"""agentd's few-row attention and SwiGLU kernels (`agentd.fewattn`; `agentd_attention` and
`agentd_swiglu` in gemv_forward.c) against MLX's: values, masks, GQA, strided caches, rows
bit-identical to the same row alone, and the calls they leave to mlx-lm's functions."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import activations, base
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from agentd import fewattn
from fewrows import attention_inputs, load_kernels

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The ctypes path: without the graph module, which an Engine made by an earlier test of
    this process may have loaded (test_graph_kernels.py tests that path)."""
    kernels = load_kernels(tmp_path_factory.mktemp("fewattn"))
    graph, kernels._graph = kernels._graph, None
    yield kernels
    kernels._graph = graph


SHAPES = [  # B, Hq, Hkv, D, Dv
    (1, 9, 3, 64, 64),    # the default model (SmolLM2-135M)
    (1, 8, 2, 128, 128),  # llama-style heads of 128
    (2, 4, 4, 16, 16),    # no GQA, a batch
    (1, 6, 3, 20, 12),    # dimensions that fill no vector
]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_mlx_attention_with_every_mask(kernel, shape):
    B, hq, hkv, d, dv = shape
    worst = 0.0
    for lk in (1, 9, 300):
        for lq in (1, 2, 5, 8, 22, 32):
            if lq > lk:
                continue
            q, k, v = attention_inputs(B, hq, hkv, lq, lk, d, dv, seed=lk * 100 + lq)
            left = mx.array(np.arange(B) % 3)
            allowed = (mx.arange(lk)[None] >= left[:, None])[:, None, None, :]  # a batch's left padding
            masks = [None, "causal", allowed, mx.where(allowed, 0.0, -1e9).astype(mx.float32)]
            for mask in masks if lq > 1 else [None, allowed]:
                got = kernel.few_row_attention(q, k, v, d**-0.5, mask)
                want = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
                assert got.shape == want.shape == (B, hq, lq, dv)
                worst = max(worst, float(mx.abs(got - want).max()))
    assert worst < 5e-6


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_a_row_is_bit_identical_to_the_same_row_alone(kernel, shape):
    """Row i of a causal chunk of lq rows equals that query computed alone over the keys it sees
    (the kernel's rows do not depend on the other rows of the call)."""
    B, hq, hkv, d, dv = shape
    for lk, lq in ((40, 22), (685, 22), (300, 32), (9, 3)):
        q, k, v = attention_inputs(B, hq, hkv, lq, lk, d, dv, seed=lk + lq)
        together = np.asarray(kernel.few_row_attention(q, k, v, 0.125, "causal"))
        for i in range(lq):
            seen = lk - lq + i + 1
            alone = kernel.few_row_attention(q[:, :, i : i + 1], k[:, :, :seen], v[:, :, :seen], 0.125, None)
            assert np.array_equal(together[:, :, i : i + 1], np.asarray(alone)), (lk, lq, i)


def test_calls_it_does_not_take_go_to_mlx_lm_unchanged(kernel):
    """More than MAX_QUERY_ROWS rows, one row (a decode step), a quantized cache, attention sinks,
    float16: mlx-lm's own function, bit for bit (the kernel's results differ from it in the last
    bits)."""
    q, k, v = attention_inputs(1, 9, 3, fewattn.MAX_QUERY_ROWS + 1, 300, 64, 64)
    want = base.scaled_dot_product_attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal")
    got = fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal")
    assert np.array_equal(np.asarray(got), np.asarray(want))

    q1, k1, v1 = attention_inputs(1, 9, 3, 1, 300, 64, 64)  # a decode step
    assert np.array_equal(np.asarray(fewattn.attention(q1, k1, v1, cache=KVCache(), scale=0.125, mask=None)),
                          np.asarray(base.scaled_dot_product_attention(q1, k1, v1, cache=KVCache(), scale=0.125,
                                                                       mask=None)))
    q, k, v = attention_inputs(1, 9, 3, 8, 300, 64, 64)
    mine = fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal")
    assert np.array_equal(np.asarray(mine), np.asarray(fewattn.few_row_attention(q, k, v, 0.125, "causal")))
    sinks = mx.zeros((9,))
    assert np.array_equal(
        np.asarray(fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal", sinks=sinks)),
        np.asarray(base.scaled_dot_product_attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal",
                                                     sinks=sinks)),
    )
    half = [a.astype(mx.float16) for a in (q, k, v)]
    assert np.array_equal(
        np.asarray(fewattn.attention(*half, cache=KVCache(), scale=0.125, mask="causal")),
        np.asarray(base.scaled_dot_product_attention(*half, cache=KVCache(), scale=0.125, mask="causal")),
    )
    qcache = QuantizedKVCache(group_size=64, bits=8)
    qk, qv = qcache.update_and_fetch(k, v)
    # mlx-lm's quantized attention scales its queries in place (`queries *= scale`): a copy each.
    assert np.array_equal(
        np.asarray(fewattn.attention(q + 0, qk, qv, cache=qcache, scale=0.125, mask="causal")),
        np.asarray(base.scaled_dot_product_attention(q + 0, qk, qv, cache=qcache, scale=0.125, mask="causal")),
    )


@pytest.mark.parametrize("B", [2, 3, 4])
def test_a_batched_decode_step_is_split_over_two_streams_and_bit_identical(kernel, B, monkeypatch):
    """One query row for each of B sequences (a batched decode step, left-padded rows): half
    the sequences go to a second CPU stream, and the result is mlx-lm's, bit for bit."""
    q, k, v = attention_inputs(B, 9, 3, 1, 300, 64, 64, seed=B)
    left = mx.array([0, 7, 40, 3][:B])
    allowed = (mx.arange(300)[None] >= left[:, None])[:, None, None, :]
    calls = []
    mlx_attention = fewattn._mlx_attention

    def recording(queries, *args, **kwargs):
        calls.append(queries.shape[0])
        return mlx_attention(queries, *args, **kwargs)

    monkeypatch.setattr(fewattn, "SPLIT_DECODE", True)
    for mask in (None, allowed):
        want = base.scaled_dot_product_attention(q, k, v, cache=KVCache(), scale=0.125, mask=mask)
        calls.clear()
        monkeypatch.setattr(fewattn, "_mlx_attention", recording)
        got = fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask=mask)
        monkeypatch.setattr(fewattn, "_mlx_attention", mlx_attention)
        assert calls == [B // 2, (B + 1) // 2] or calls == [(B + 1) // 2, B // 2]
        assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("pads", [[0, 7, 40], [200, 0, 3], [150, 160, 0, 170], [5, 5]])
def test_a_batched_decode_step_over_a_batch_cache_skips_padding_and_is_bit_identical(kernel, pads, monkeypatch):
    """Over mlx-lm's BatchKVCache (rows left-padded to the longest), each part of the split
    attends from its rows' first unpadded key: a row much shorter than the others costs its
    own length, and every row's result is still the whole batch's through mlx-lm, bit for
    bit (and so the same as that row alone, computed from its first key)."""
    from mlx_lm.models.cache import BatchKVCache

    B = len(pads)
    cache = BatchKVCache(pads)
    k, v = (mx.random.normal((B, 3, 300, 64), key=mx.random.key(i)) for i in (1, 2))
    cache.update_and_fetch(k, v)  # the merged prompts: row b's keys from pads[b] on
    mask = cache.make_mask(1)
    q1, k1, v1 = attention_inputs(B, 9, 3, 1, 1, 64, 64, seed=B)
    keys, values = cache.update_and_fetch(k1, v1)
    seen = []
    mlx_attention = fewattn._mlx_attention

    def recording(queries, k_, *args, **kwargs):
        seen.append((queries.shape[0], k_.shape[2]))
        return mlx_attention(queries, k_, *args, **kwargs)

    want = base.scaled_dot_product_attention(q1, keys, values, cache=cache, scale=0.125, mask=mask)
    monkeypatch.setattr(fewattn, "SPLIT_DECODE", True)
    monkeypatch.setattr(fewattn, "_mlx_attention", recording)
    got = fewattn.attention(q1, keys, values, cache=cache, scale=0.125, mask=mask)
    monkeypatch.setattr(fewattn, "_mlx_attention", mlx_attention)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert sum(rows for rows, _ in seen) == B and len(seen) == 2
    if pads == [0, 7, 40]:  # the longest row alone, the other two from key 7
        assert sorted(seen) == [(1, 301), (2, 301 - 7)]
    for b in range(B):  # each row as if it ran alone over its own keys
        alone = base.scaled_dot_product_attention(q1[b:b + 1], keys[b:b + 1, :, pads[b]:], values[b:b + 1, :, pads[b]:],
                                                  cache=None, scale=0.125, mask=None)
        assert np.allclose(np.asarray(got[b:b + 1]), np.asarray(alone), atol=1e-6)


def test_the_kernel_refuses_shapes_it_cannot_take(kernel):
    q, k, v = attention_inputs(1, 8, 3, 2, 10, 16, 16)  # 8 query heads over 3 KV heads
    assert kernel.few_row_attention(q, k, v, 0.25, "causal") is None


def test_swiglu_matches_mlx_and_rows_are_bit_identical(kernel):
    worst = 0.0
    for rows, width in ((8, 1536), (22, 1536), (32, 1536), (9, 37), (16, 3)):
        gate = mx.random.normal((1, rows, width), key=mx.random.key(rows)) * 6
        up = mx.random.normal((1, rows, width), key=mx.random.key(rows + 1))
        got, want = fewattn.swiglu(gate, up), activations.swiglu(gate, up)
        assert got.shape == want.shape and got.dtype == mx.float32
        worst = max(worst, float((mx.abs(got - want) / (1e-6 + mx.abs(want))).max()))
        # Each row as it comes out at another place of another call (other lanes, another tail).
        for i in range(rows):
            g8 = mx.concatenate([gate[:, :3] + 1, gate[:, i : i + 1], gate[:, :4]], axis=1)
            u8 = mx.concatenate([up[:, :3], up[:, i : i + 1], up[:, :4]], axis=1)
            assert np.array_equal(np.asarray(fewattn.swiglu(g8, u8))[0, 3], np.asarray(got)[0, i])
    assert worst < 1e-5
    # Below SWIGLU_MIN_ROWS (a decode step) and above MAX_QUERY_ROWS: mlx-lm's, bit for bit.
    for rows in (1, fewattn.SWIGLU_MIN_ROWS - 1, fewattn.MAX_QUERY_ROWS + 1):
        gate, up = mx.random.normal((1, rows, 64)), mx.random.normal((1, rows, 64))
        assert np.array_equal(np.asarray(fewattn.swiglu(gate, up)), np.asarray(activations.swiglu(gate, up)))
