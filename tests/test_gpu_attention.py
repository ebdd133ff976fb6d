"""The composed attention agentd uses for short prefills on CUDA (agentd.gpu_attention),
checked on the CPU against MLX's own `mx.fast.scaled_dot_product_attention`."""

from __future__ import annotations

import mlx.core as mx
import pytest

from agentd import gpu_attention


def _qkv(B=2, Hq=8, Hk=2, L=7, S=40, D=16, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    return (mx.random.normal((B, Hq, L, D)).astype(dtype), mx.random.normal((B, Hk, S, D)).astype(dtype),
            mx.random.normal((B, Hk, S, D)).astype(dtype))


def _masks(B, Hq, L, S):
    mx.random.seed(1)
    return {
        "none": None,
        "causal": "causal",
        "bool, one for all heads": mx.random.uniform(shape=(B, 1, L, S)) > 0.3,
        "bool, per head": mx.random.uniform(shape=(B, Hq, L, S)) > 0.3,
        "additive, broadcast": mx.random.normal((L, S)),
    }


@pytest.mark.parametrize("L", [7, 8, 33])  # padded to 8, as it is, padded to 64
@pytest.mark.parametrize("Hk", [8, 2, 1])  # plain, grouped-query, multi-query heads
@pytest.mark.parametrize("mask_kind", list(_masks(1, 1, 1, 1)))
def test_composed_attention_equals_mlx_attention(Hk, mask_kind, L):
    B, Hq, S = 2, 8, 40
    q, k, v = _qkv(B=B, Hq=Hq, Hk=Hk, L=L, S=S)
    mask = _masks(B, Hq, L, S)[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = gpu_attention.composed(q, k, v, 0.25, mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_causal_rows_see_only_keys_up_to_their_own_position():
    # Changing the last key moves only the last query row's output.
    q, k, v = _qkv(B=1, Hq=4, Hk=2, L=5, S=12)
    a = gpu_attention.composed(q, k, v, 0.5, "causal")
    k2 = mx.concatenate([k[:, :, :-1], k[:, :, -1:] + 3.0], axis=2)
    b = gpu_attention.composed(q, k2, v, 0.5, "causal")
    assert mx.array_equal(a[:, :, :-1], b[:, :, :-1]).item()
    assert not mx.allclose(a[:, :, -1], b[:, :, -1]).item()


def test_bfloat16_stays_close_to_mlx():
    q, k, v = _qkv(L=33, S=300, dtype=mx.bfloat16)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal").astype(mx.float32)
    got = gpu_attention.composed(q, k, v, 0.25, "causal")
    assert got.dtype == mx.bfloat16
    assert mx.allclose(got.astype(mx.float32), want, rtol=2e-2, atol=2e-2).item()


def test_the_dispatcher_sends_only_short_multi_row_passes_to_the_composed_path():
    calls = []

    def fused(q, k, v, *, scale, mask=None, **kwargs):
        calls.append(("fused", q.shape[2], sorted(kwargs)))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, **kwargs)

    sdpa = gpu_attention.dispatcher(fused)
    q, k, v = _qkv(L=7)
    mx.eval(sdpa(q, k, v, scale=0.25, mask="causal"))  # a short prefill: composed
    assert calls == []
    mx.eval(sdpa(q[:, :, :1], k, v, scale=0.25))  # a decode step: MLX's vector kernel
    assert calls == [("fused", 1, [])]
    calls.clear()
    long_q = mx.zeros((1, 8, gpu_attention.MAX_QUERY_ROWS + 1, 16))
    mx.eval(sdpa(long_q, k[:1], v[:1], scale=0.25, mask="causal"))  # a long chunk: cuDNN
    assert calls == [("fused", gpu_attention.MAX_QUERY_ROWS + 1, [])]
    calls.clear()
    sinks = mx.zeros((8,))
    mx.eval(sdpa(q, k, v, scale=0.25, mask="causal", sinks=sinks))  # attention sinks: MLX's
    assert calls == [("fused", 7, ["sinks"])]


def test_huge_score_matrices_stay_on_the_fused_path(monkeypatch):
    q, k, _ = _qkv(L=7, S=40)
    monkeypatch.setattr(gpu_attention, "MAX_SCORE_BYTES", 2 * 8 * 8 * 40 * 4 - 1)
    assert not gpu_attention.short_enough(q, k)  # 7 rows, padded to 8, of 40 keys: one byte over
    monkeypatch.setattr(gpu_attention, "MAX_SCORE_BYTES", 2 * 8 * 8 * 40 * 4)
    assert gpu_attention.short_enough(q, k)


def test_install_wraps_once_and_keeps_mlx_function(monkeypatch):
    original = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", original)
    assert gpu_attention.install()
    wrapped = mx.fast.scaled_dot_product_attention
    assert wrapped.fused is original
    assert gpu_attention.install()
    assert mx.fast.scaled_dot_product_attention is wrapped  # not wrapped twice
