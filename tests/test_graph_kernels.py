"""agentd's few-row kernels as nodes of MLX's graph (`agentd.graph_kernels`, graph_kernels.cpp):
the same bits as the kernels through ctypes, decode rows (one query each, left-padded batches)
equal to the row alone, and what `agentd.fewattn` routes to them."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import activations, base
from mlx_lm.models.cache import BatchKVCache, KVCache

from agentd import blas, fewattn, graph_kernels
from fewrows import attention_inputs, load_kernels

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("cc")
    or importlib.util.find_spec("nanobind") is None,
    reason="needs Linux, C and C++ compilers and nanobind (make setup installs it when it can)",
)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The module bound to a freshly built few-row library (loaded through ctypes, as
    `fewattn.load` does), and that library's ctypes path for comparison."""
    load_kernels(tmp_path_factory.mktemp("graph"))
    lib = fewattn._lib
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    # The default cache directory: the build the daemon uses (make setup makes it).
    module, why = graph_kernels.load(address(lib.agentd_attention), address(lib.agentd_swiglu))
    assert module is not None, why
    return module


_KIND = {None: 0, "causal": 1}


def _graph_attention(graph, q, k, v, scale, mask):
    kind = _KIND.get(mask, 2) if not isinstance(mask, mx.array) else (2 if mask.dtype == mx.bool_ else 3)
    return graph.attention(q, k, v, scale, kind, mask if isinstance(mask, mx.array) else None)


@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 64), (2, 8, 2, 128, 128), (1, 6, 3, 20, 12)])
def test_the_same_bits_as_the_kernel_through_ctypes_and_close_to_mlx(graph, shape):
    B, hq, hkv, d, dv = shape
    worst = 0.0
    for lk, lq in ((9, 1), (300, 1), (300, 2), (300, 22), (40, 32)):
        q, k, v = attention_inputs(B, hq, hkv, lq, lk, d, dv, seed=lk + lq)
        left = mx.array(np.arange(B) % 3)
        allowed = (mx.arange(lk)[None] >= left[:, None])[:, None, None, :]
        for mask in [None, allowed, mx.where(allowed, 0.0, -1e9)] + (["causal"] if lq > 1 else []):
            got = _graph_attention(graph, q, k, v, d**-0.5, mask)
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
            assert got.shape == want.shape == (B, hq, lq, dv)
            worst = max(worst, float(mx.abs(got - want).max()))
            if lq > 1:
                ctypes_path = fewattn.few_row_attention(q, k, v, d**-0.5, mask)
                assert np.array_equal(np.asarray(got), np.asarray(ctypes_path)), (lk, lq)
    assert worst < 5e-6


def test_a_strided_last_axis_is_read_right(graph):
    q, k, v = attention_inputs(1, 4, 2, 3, 50, 16, 16)
    kt = mx.random.normal((1, 2, 16, 50)).transpose(0, 1, 3, 2)  # the head dimension strided
    got = _graph_attention(graph, q, kt, v, 0.25, "causal")
    want = mx.fast.scaled_dot_product_attention(q, kt, v, scale=0.25, mask="causal")
    assert float(mx.abs(got - want).max()) < 5e-6


def test_shapes_it_does_not_take_are_refused_with_a_value_error(graph):
    q, k, v = attention_inputs(1, 8, 3, 2, 10, 16, 16)  # 8 query heads over 3 KV heads
    with pytest.raises(ValueError):
        graph.attention(q, k, v, 0.25, 1, None)
    with pytest.raises(ValueError):
        graph.attention(q.astype(mx.float16), k, v, 0.25, 1, None)
    with pytest.raises(ValueError):
        graph.swiglu(mx.zeros((2, 8)), mx.zeros((2, 9)))


@pytest.mark.parametrize("pads", [[0, 7, 40], [200, 0, 3], [150, 160, 0, 170], [5, 5]])
def test_a_batched_decode_step_gives_each_row_its_bits_alone(graph, pads, monkeypatch):
    """One query row for each sequence of mlx-lm's BatchKVCache (rows left-padded to the
    longest), through fewattn: each row is the same bits as that row alone over its own keys,
    which is what makes a batched decode step's logits those of each agent's solo step."""
    monkeypatch.setattr(fewattn, "_graph", graph)
    B = len(pads)
    cache = BatchKVCache(pads)
    k, v = (mx.random.normal((B, 3, 300, 64), key=mx.random.key(i)) for i in (1, 2))
    cache.update_and_fetch(k, v)
    mask = cache.make_mask(1)
    q1, k1, v1 = attention_inputs(B, 9, 3, 1, 1, 64, 64, seed=B)
    keys, values = cache.update_and_fetch(k1, v1)
    got = fewattn.attention(q1, keys, values, cache=cache, scale=0.125, mask=mask)
    want = base.scaled_dot_product_attention(q1, keys, values, cache=cache, scale=0.125, mask=mask)
    assert float(mx.abs(got - want).max()) < 5e-6
    for b in range(B):
        alone = fewattn.attention(q1[b:b + 1], keys[b:b + 1, :, pads[b]:], values[b:b + 1, :, pads[b]:],
                                  cache=KVCache(), scale=0.125, mask=None)
        assert np.array_equal(np.asarray(got[b:b + 1]), np.asarray(alone)), b


def test_fewattn_routes_few_rows_to_the_graph_and_the_rest_to_mlx_lm(graph, monkeypatch):
    monkeypatch.setattr(fewattn, "_graph", graph)
    assert fewattn.mode() == "graph"
    calls = []

    class Recording:
        def attention(self, *args):
            calls.append(args[0].shape[2])
            return graph.attention(*args)

    monkeypatch.setattr(fewattn, "_graph", Recording())
    for lq in (1, 2, 32, 33):
        q, k, v = attention_inputs(1, 9, 3, lq, 300, 64, 64, seed=lq)
        got = fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal" if lq > 1 else None)
        want = base.scaled_dot_product_attention(q, k, v, cache=KVCache(), scale=0.125,
                                                 mask="causal" if lq > 1 else None)
        if lq > fewattn.MAX_QUERY_ROWS:  # a prefill chunk: mlx-lm's, bit for bit
            assert np.array_equal(np.asarray(got), np.asarray(want))
        else:
            assert float(mx.abs(got - want).max()) < 5e-6
    assert calls == [1, 2, 32]

    class Refusing:
        def attention(self, *args):
            raise ValueError("shapes the kernel does not take")

    monkeypatch.setattr(fewattn, "_graph", Refusing())  # a call it refuses: mlx-lm's, not an error
    q, k, v = attention_inputs(1, 9, 3, 4, 300, 64, 64)
    got = fewattn.attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal")
    want = base.scaled_dot_product_attention(q, k, v, cache=KVCache(), scale=0.125, mask="causal")
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_swiglu_the_same_bits_as_through_ctypes_and_decode_rows_too(graph, monkeypatch):
    worst = 0.0
    for rows, width in ((1, 1536), (3, 1536), (8, 1536), (22, 1536), (9, 37)):
        gate = mx.random.normal((1, rows, width), key=mx.random.key(rows)) * 6
        up = mx.random.normal((1, rows, width), key=mx.random.key(rows + 1))
        want = activations.swiglu(gate, up)
        got = graph.swiglu(gate, up)
        worst = max(worst, float((mx.abs(got - want) / (1e-6 + mx.abs(want))).max()))
        if rows >= fewattn.SWIGLU_MIN_ROWS:
            assert np.array_equal(np.asarray(got), np.asarray(fewattn.swiglu(gate, up)))
        # A transposed (non-contiguous) input is read as its values, not its storage.
        assert np.array_equal(np.asarray(graph.swiglu(gate.T, up.T)), np.asarray(got).T)
    assert worst < 1e-5
    monkeypatch.setattr(fewattn, "_graph", graph)
    g, u = mx.random.normal((1, 1, 576)), mx.random.normal((1, 1, 576))
    assert np.array_equal(np.asarray(fewattn.swiglu(g, u)), np.asarray(graph.swiglu(g, u)))


def test_the_graph_path_evaluates_nothing_where_the_ctypes_path_does(graph, monkeypatch):
    """A node of the graph leaves its inputs lazy, so a forward pass stays one evaluation; the
    ctypes path evaluates them at every call (once a layer)."""
    evaluations = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (evaluations.append(len(a)), real_eval(*a)))
    q, k, v = attention_inputs(1, 9, 3, 22, 300, 64, 64)
    gate, up = mx.random.normal((1, 22, 1536)), mx.random.normal((1, 22, 1536))
    for path in (graph, None):
        monkeypatch.setattr(fewattn, "_graph", path)
        evaluations.clear()
        out = fewattn.attention(q * 1.0, k, v, cache=KVCache(), scale=0.125, mask="causal")
        act = fewattn.swiglu(gate * 1.0, up)
        assert (evaluations == []) == (path is not None), evaluations
        real_eval(out, act)


def test_build_is_cached_and_needs_a_compiler(tmp_path):
    first = graph_kernels.build()
    assert first and graph_kernels.build() == first and graph_kernels.MODULE in first
    assert graph_kernels.build(tmp_path, compiler=str(tmp_path / "no-such-c++")) is None
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*partial"))


def test_unwritten_arrays_have_the_shapes_asked_and_hold_what_is_written_into_them(graph):
    """`unwritten` (a restore's new arrays, written once by its reads): evaluated arrays of the
    shapes and dtypes asked, whose memory a writable numpy view reaches."""
    from agentd.kvrows import _shared_view

    shapes, dtypes = [[1, 3, 300, 64], [2, 5], [0, 4]], [mx.float32, mx.uint16, mx.float32]
    arrays = graph.unwritten(shapes, dtypes)
    assert [a.shape for a in arrays] == [tuple(s) for s in shapes] and [a.dtype for a in arrays] == dtypes
    for a, fill in zip(arrays[:2], (1.5, 7)):
        _shared_view(a)[...] = fill
        assert mx.all(a == fill).item()
    with pytest.raises(ValueError):
        graph.unwritten([[2, -1]], [mx.float32])
    with pytest.raises(ValueError):
        graph.unwritten([[2]], [])


@pytest.mark.parametrize("from_module", [True, False], ids=["module-arrays", "mx.load-arrays"])
def test_a_restore_into_the_modules_arrays_gives_back_the_saved_cache(graph, tiny_llama_dir, home, from_module,
                                                                      monkeypatch):
    """A restore makes its arrays with the module's `unwritten` where this process loaded it
    (mx.load's way otherwise): either way the cache comes back as it was saved."""
    from agentd import restore_arrays
    from agentd.agents import AgentStore
    from agentd.engine import Engine

    assert graph_kernels.loaded() is not None  # the fixture loaded it: what a restore asks for
    made = []
    real = graph.unwritten

    class Spy:
        def unwritten(self, shapes, dtypes):
            made.append(len(shapes))
            return real(shapes, dtypes)

    monkeypatch.setattr(graph_kernels, "loaded", lambda: Spy())
    monkeypatch.setattr(restore_arrays, "NATIVE_ARRAYS", from_module)
    # The fixture mapped the few-row library into this process: an Engine would install its
    # kernels into mlx-lm for every later test. The restore does not need them.
    monkeypatch.setattr(blas, "gemv_forward_active", lambda: False)
    store = AgentStore(home, Engine(tiny_llama_dir))
    store.create("a", "", "You are terse. " * 20)
    store.chat("a", "Say something.", max_tokens=5)
    store.save("a")
    hot = store._hot["a"]
    loaded = store.repo.load("a")
    assert bool(made) == from_module
    assert loaded.tokens == hot.tokens
    for want, got in zip(hot.cache, loaded.cache):
        n = want.offset
        assert got.offset == n
        assert np.array_equal(np.array(want.keys[..., :n, :]), np.array(got.keys[..., :n, :]))
        assert np.array_equal(np.array(want.values[..., :n, :]), np.array(got.values[..., :n, :]))
