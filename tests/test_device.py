"""agentd.device (CPU plan: dequantize, one-row products) and agentd.blas (re-exec, forwarder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from agentd import blas, device, gpu_attention

PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3, 3], [250, 12, 77, 1, 0, 64, 31, 8], [42]]


def tiny_quantized_llama(seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    # Larger than default weights, so greedy choices are not near-ties of noise.
    model.update(
        {"model": {"embed_tokens": {"weight": mx.random.normal((256, 64)) * 0.5}}}
    )
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def greedy(model: nn.Module, prompt: list[int], steps: int = 8) -> list[int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        tok = mx.argmax(logits[0, -1]).item()
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def test_cpu_plan_dequantizes_and_records_dtype():
    model = tiny_quantized_llama()
    plan = device.prepare_for_device(model, force_cpu=True)
    assert plan.device == "cpu"
    assert plan.compute_dtype == "float32"
    # 3 layers x 7 projections + the tied embedding.
    assert plan.dequantized == 22
    kinds = {type(m) for _, m in model.named_modules()}
    assert nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    assert model.model.norm.weight.dtype == mx.float32
    assert plan.to_dict()["compute_dtype"] == "float32"


def test_cpu_plan_greedy_tokens_agree_with_quantized_reference():
    reference = tiny_quantized_llama()
    fast = tiny_quantized_llama()
    device.prepare_for_device(fast, force_cpu=True)
    for prompt in PROMPTS:
        assert greedy(fast, prompt) == greedy(reference, prompt)


def test_gemv_route_matches_mlx_matmul():
    mx.random.seed(1)
    w, b = mx.random.normal((48, 64)), mx.random.normal((48,))
    layer = device.CpuLinear(w, b)
    for shape in [(1, 1, 64), (1, 64), (64,), (1, 3, 64)]:
        x = mx.random.normal(shape)
        assert layer(x).shape == (*shape[:-1], 48)
        assert mx.allclose(layer(x), x @ w.T + b, atol=1e-4).item()
    emb = device.CpuEmbedding(w)
    x = mx.random.normal((1, 1, 64))
    assert mx.allclose(emb.as_linear(x), x @ w.T, atol=1e-4).item()
    assert mx.array_equal(emb(mx.array([[2, 5]])), w[mx.array([[2, 5]])]).item()


@pytest.mark.parametrize("gpu", [device.METAL, device.CUDA])
def test_gpu_plans_keep_quantized_weights(gpu, monkeypatch):
    # a CUDA plan routes attention through agentd.gpu_attention: undone after this test
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", mx.fast.scaled_dot_product_attention)
    model = tiny_quantized_llama()
    plan = device.prepare_for_device(model, device_backend=gpu)
    assert plan.device == "gpu" and plan.backend == gpu and plan.dequantized == 0
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert plan.quantized == 22  # 3 layers x 7 projections + the tied embedding, as loaded
    assert plan.compute_dtype == "float32"  # the scales' dtype of this random model
    assert device.describe(plan).startswith("device: " + {"metal": "Metal", "cuda": "CUDA"}[gpu])
    # Only on CUDA does a short prefill's attention leave MLX's fused kernel (cuDNN there).
    assert plan.short_attention_rows == (gpu_attention.MAX_QUERY_ROWS if gpu == device.CUDA else 0)
    assert hasattr(mx.fast.scaled_dot_product_attention, "fused") == (gpu == device.CUDA)


def test_backend_decision():
    """CUDA is a GPU, not the CPU: only a CPU default device or no GPU backend means "cpu"."""
    decide = device.decide_backend
    assert decide(default_is_gpu=True, metal=True, cuda=False) == device.METAL
    assert decide(default_is_gpu=True, metal=False, cuda=True) == device.CUDA
    # mlx[cpu] on Linux: no GPU backend, whatever the default device says.
    assert decide(default_is_gpu=True, metal=False, cuda=False) == device.CPU
    assert decide(default_is_gpu=False, metal=False, cuda=False) == device.CPU
    # A GPU present but the CPU chosen as default device (mx.set_default_device(mx.cpu)).
    assert decide(default_is_gpu=False, metal=False, cuda=True) == device.CPU
    assert decide(default_is_gpu=False, metal=True, cuda=False) == device.CPU


def test_backend_on_this_machine_matches_mlx():
    expected = device.CPU if mx.default_device() == mx.cpu else (
        device.METAL if mx.metal.is_available() else device.CUDA)
    assert device.backend() == expected
    assert device.on_cpu() == (expected == device.CPU)


# --- blas: the start-up decision, never an actual exec -------------------------------


@pytest.fixture
def fake_openblas(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    return str(lib)


def no_compiler() -> None:
    return None


def test_reexec_when_openblas_found(fake_openblas):
    d = blas.decide({"PATH": "/bin"}, platform="linux", candidates=[fake_openblas],
                    build_forwarder=lambda: "/c/libagentd_gemv_forward-x.so")
    assert d.library == fake_openblas and d.notice is None
    # The forwarder first: MLX's cblas_sgemm lookup must find it before OpenBLAS's.
    assert d.exec_env["LD_PRELOAD"] == f"/c/libagentd_gemv_forward-x.so:{fake_openblas}"
    assert d.exec_env[blas.ENV_MARKER] == "1"
    assert d.exec_env["PATH"] == "/bin"
    assert int(d.exec_env["OPENBLAS_NUM_THREADS"]) >= 1


def test_existing_preload_and_thread_setting_kept(fake_openblas):
    env = {"LD_PRELOAD": "/x/libfoo.so", "OPENBLAS_NUM_THREADS": "3"}
    d = blas.decide(env, platform="linux", candidates=[fake_openblas], build_forwarder=lambda: "/c/f.so")
    assert d.exec_env["LD_PRELOAD"] == f"/c/f.so:{fake_openblas}:/x/libfoo.so"
    assert d.exec_env["OPENBLAS_NUM_THREADS"] == "3"


def test_without_compiler_openblas_alone_and_one_line_notice(fake_openblas):
    d = blas.decide({}, platform="linux", candidates=[fake_openblas], build_forwarder=no_compiler)
    assert d.exec_env["LD_PRELOAD"] == fake_openblas
    assert d.notice == blas.NO_FORWARD_NOTICE and "\n" not in d.notice


def test_forwarder_switch_off_never_builds(fake_openblas):
    d = blas.decide({blas.FORWARD_SWITCH: "off"}, platform="linux", candidates=[fake_openblas],
                    build_forwarder=lambda: pytest.fail("must not build"))
    assert d.exec_env["LD_PRELOAD"] == fake_openblas and d.notice is None


def test_marker_prevents_loop(fake_openblas):
    d = blas.decide({blas.ENV_MARKER: "1"}, platform="linux", candidates=[fake_openblas])
    assert d.exec_env is None and d.notice is None
    d = blas.decide({"LD_PRELOAD": fake_openblas}, platform="linux", candidates=[fake_openblas])
    assert d.exec_env is None and d.library == fake_openblas


@pytest.mark.parametrize("value", ["off", "OFF", "0"])
def test_switch_off_disables(fake_openblas, value):
    d = blas.decide({blas.ENV_SWITCH: value}, platform="linux", candidates=[fake_openblas],
                    build_forwarder=lambda: pytest.fail("must not build"))
    assert d == blas.Decision(None, None, None)


def test_missing_library_gives_one_line_notice(tmp_path):
    d = blas.decide({}, platform="linux", candidates=[str(tmp_path / "nope.so")])
    assert d.exec_env is None
    assert d.notice == blas.NOTICE and "\n" not in d.notice
    assert "libopenblas0-pthread" in d.notice


def test_explicit_library_path(fake_openblas, tmp_path):
    d = blas.decide({blas.ENV_SWITCH: fake_openblas}, platform="linux", candidates=[],
                    build_forwarder=no_compiler)
    assert d.exec_env["LD_PRELOAD"] == fake_openblas
    d = blas.decide({blas.ENV_SWITCH: str(tmp_path / "gone.so")}, platform="linux")
    assert d.exec_env is None and d.notice == blas.NOTICE


def test_not_linux_does_nothing(fake_openblas):
    d = blas.decide({}, platform="darwin", candidates=[fake_openblas])
    assert d == blas.Decision(None, None, None)


def test_maybe_reexec_prints_notice_and_returns(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(blas, "CANDIDATES", (str(tmp_path / "nope.so"),))
    monkeypatch.setattr(blas, "decide", lambda env: blas.Decision(None, None, blas.NOTICE))
    monkeypatch.setattr(blas.os, "execve", lambda *a: pytest.fail("must not exec"))
    d = blas.maybe_reexec_with_fast_blas(["agentd"])
    assert d.notice == blas.NOTICE
    assert capsys.readouterr().err.strip() == blas.NOTICE


def test_maybe_reexec_execs_with_env(monkeypatch, fake_openblas):
    calls = []
    decision = blas.decide({}, platform="linux", candidates=[fake_openblas], build_forwarder=no_compiler)
    monkeypatch.setattr(blas, "decide", lambda env: decision)

    def fake_execve(path, args, env):
        calls.append((path, args, env))
        raise SystemExit(0)

    monkeypatch.setattr(blas.os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        blas.maybe_reexec_with_fast_blas(["agentd", "serve"])
    assert calls and calls[0][2]["LD_PRELOAD"] == fake_openblas


def test_mlx_blas_names_something():
    assert blas.mlx_blas() in ("openblas", "reference", "unknown")


# --- the sgemm forwarder, built and preloaded for real --------------------------------

needs_forwarder = pytest.mark.skipif(
    not (blas.find_openblas() and (shutil.which("cc") or shutil.which("gcc"))),
    reason="needs a system OpenBLAS and a C compiler (make setup installs the first)",
)


def test_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    built = blas.build_gemv_forward(tmp_path)
    assert built and Path(built).parent == tmp_path and Path(built).stat().st_size > 0
    mtime = Path(built).stat().st_mtime_ns
    assert blas.build_gemv_forward(tmp_path) == built
    assert Path(built).stat().st_mtime_ns == mtime
    other = tmp_path / "other"
    assert blas.build_gemv_forward(other, compiler=str(tmp_path / "no-such-cc")) is None
    assert not other.exists() or list(other.iterdir()) == []


FORWARDED_SCRIPT = r"""
import json, sys
import mlx.core as mx, numpy as np
from agentd import blas, device
sys.path.insert(0, sys.argv[1])
from test_device import PROMPTS, greedy, tiny_quantized_llama
worst, cases, variant = 0.0, 0, {}
mx.random.seed(3)

def check(got, want):
    global worst, cases
    got = np.asarray(got).reshape(want.shape)
    worst = max(worst, float(np.abs(got - want).max() / (1 + np.abs(want).max())))
    cases += 1

# The model's shapes (scaled down where only the layout matters) and ragged ones.
for n, k in [(3072, 576), (576, 1536), (729, 64), (64, 729), (48, 64), (7, 5), (1, 9), (33, 17)]:
    wide = mx.random.normal((n, k + 3))
    w = mx.contiguous(wide[:, :k])
    w_strided = wide[:, 1 : k + 1]  # ldb = k + 3
    wt = mx.contiguous(w.T)  # stored k x n: the no-transpose B layout
    for m in [1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 24, 32, 33]:
        xs = mx.random.normal((m, k + 5))
        x, x_strided = mx.contiguous(xs[:, :k]), xs[:, 2 : k + 2]
        xt = mx.contiguous(x.T).T  # a transposed-storage left operand
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        for got in (x @ w.T, x @ wt, xt @ w.T, xt @ wt, x[None] @ w.T):
            check(got, want)
        check(x_strided @ w_strided.T,
              np.asarray(x_strided, np.float64) @ np.asarray(w_strided, np.float64).T)
        c = mx.random.normal((m, n))
        c64 = np.asarray(c, np.float64)
        check(mx.addmm(c, x, w.T, alpha=0.5, beta=2.0), 0.5 * want + 2.0 * c64)
        check(mx.addmm(c, x, wt, alpha=-1.5, beta=0.25), -1.5 * want + 0.25 * c64)
        # Batch invariance: each row as computed alone, bit for bit (m <= 32 only).
        together, together_nn = np.asarray(x @ w.T), np.asarray(x @ wt)
        variant[m] = all(
            np.array_equal(together[i], np.asarray(x[i : i + 1] @ w.T)[0])
            and np.array_equal(together_nn[i], np.asarray(x[i : i + 1] @ wt)[0])
            for i in range(m)
        )
model = tiny_quantized_llama()
plan = device.prepare_for_device(model, force_cpu=True)
import mlx_lm.models.llama as llama
from agentd import fewattn
print(json.dumps({"active": blas.gemv_forward_active(), "one_row": plan.one_row,
                  "attention": plan.attention,
                  "routed": llama.scaled_dot_product_attention is fewattn.attention and llama.swiglu is fewattn.swiglu,
                  "gemv_rows": plan.gemv_rows, "worst": worst, "cases": cases,
                  "row_invariant": variant,
                  "greedy": [greedy(model, p) for p in PROMPTS]}))
"""


@needs_forwarder
def test_forwarded_few_row_products_and_greedy_tokens_are_exact(tmp_path):
    """m = 1..32 products in every operand layout (transposes, leading dimensions, alpha and
    beta) against float64, rows bit-identical to the same row alone, and greedy tokens (through
    agentd's few-row attention too) equal to the quantized reference's, in a process with the
    forwarder preloaded as agentd does."""
    forwarder = blas.build_gemv_forward(tmp_path)
    env = dict(os.environ, LD_PRELOAD=f"{forwarder}:{blas.find_openblas()}", OPENBLAS_NUM_THREADS="2")
    env[blas.ENV_MARKER] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", FORWARDED_SCRIPT, str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["active"] and out["one_row"] == "forwarded" and out["gemv_rows"] == 0
    # Few-row attention runs in the same library, as MLX graph nodes where agentd.graph_kernels
    # builds (make setup: needs nanobind), else through ctypes: greedy tokens below go through it.
    from agentd import graph_kernels

    assert out["attention"] == ("graph" if graph_kernels.build() else "agentd") and out["routed"]
    assert out["cases"] == 8 * 13 * 8
    assert out["worst"] < 1e-5
    # 33 rows go to OpenBLAS, which promises nothing about rows; up to 32 the kernel does.
    tried = {int(m): same for m, same in out["row_invariant"].items()}
    assert len(tried) == 13 and all(same for m, same in tried.items() if m <= 32)
    # The same random model, quantized, in this process (no preload): same greedy answers.
    reference = tiny_quantized_llama()
    assert out["greedy"] == [greedy(reference, p) for p in PROMPTS]


def test_native_build_falls_back_to_generic(tmp_path):
    """A compiler that refuses -march=native still gets a working (generic) build."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-no-native"
    wrapper.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -march=native ] && exit 1; done\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    built = blas.build_gemv_forward(tmp_path / "c", compiler=str(wrapper))
    assert built and Path(built).stat().st_size > 0
