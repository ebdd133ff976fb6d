"""agentd on MLX's CUDA backend (an NVIDIA GPU): marked `cuda`, skipped without one.

Run on the GPU machine with `python -m pytest -q -m cuda` (benchmarks/gpu.py's docstring
says how to install the wheels there). A tiny llama in the dtype and quantization of
real checkpoints (bfloat16, 4-bit, groups of 64), so it needs the same GPU kernels.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from daemonproc import DaemonProc
from mlx.utils import tree_flatten

import tinymodels
from agentd import warmup
from agentd.backend import CUDA

pytestmark = pytest.mark.cuda

# A cold kernel cache compiles for minutes before the daemon is ready (agentd.warmup).
START_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def tiny_4bit_dir(tmp_path_factory) -> Path:
    """Two llama layers with llama-8B's head width (128), so a kernel cache that a real
    model filled serves it too (MLX compiles per head width, dtype and quantization)."""
    from mlx_lm.models import llama

    out = tmp_path_factory.mktemp("models") / "tiny-llama-4bit"
    out.mkdir(parents=True, exist_ok=True)
    vocab = tinymodels._write_tokenizer(out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>",
                                        "<|im_end|>", tinymodels.CHATML_TEMPLATE)
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
              "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "vocab_size": vocab,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})
    config["quantization"] = {"group_size": 64, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    return out


def kernel_files(cache_home: Path) -> set[str]:
    return {str(p) for p in (cache_home / "agentd" / "mlx-ptx").rglob("*") if p.is_file()}


def test_cuda_backend_is_not_taken_for_the_cpu():
    from agentd import device

    assert device.backend() == CUDA and not device.on_cpu()


def test_a_4bit_model_loads_as_4bit(tiny_4bit_dir):
    from agentd.device import describe
    from agentd.engine import Engine

    engine = Engine(tiny_4bit_dir)
    assert engine.plan.backend == CUDA and engine.plan.device == "gpu"
    assert engine.plan.dequantized == 0 and engine.plan.quantized == 2 * 7 + 1
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert engine.dtype == "bfloat16"
    assert describe(engine.plan).startswith("device: CUDA, weights as loaded (15 layers quantized)")


def test_no_kernel_is_compiled_inside_a_turn_and_restore_works(tiny_4bit_dir, home, monkeypatch):
    """The daemon compiles before it answers; turns of any prompt length then compile
    nothing; after a restart the agent's cache comes from disk."""
    # agentd's kernel cache: fresh, unless the caller shares one (a cold one takes minutes).
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or home / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.delenv(warmup.PTX_ENV, raising=False)
    d = DaemonProc(home, tiny_4bit_dir, "--log-level", "info").start(timeout=START_TIMEOUT_S)
    try:
        with d.client() as c:
            status = c.status()["model"]
        assert status["backend"] == CUDA and status["quantized_layers"] == 15
        assert status["warmup"]["passes"] >= 10 and status["warmup"]["seconds"] > 0
        compiled = kernel_files(cache_home)
        assert compiled, "the warm-up compiled nothing into agentd's kernel cache"
        with d.client() as c:
            c.create("a", system="You are a technical specialist.")
            for words in (1, 7, 30, 120, 700):
                c.chat("a", " ".join(["checkout"] * words), max_tokens=12).wait()
            c.chat("a", "Again, with sampling.", max_tokens=8, temperature=0.8, seed=3).wait()
            before = c.show("a")["agent"]
            for name in ("b", "c", "e"):
                c.create(name, system=f"You are agent {name}.")

        def chat(name: str, words: int) -> None:  # several agents at once: batched decode
            with d.client() as c:
                c.chat(name, " ".join(["refund"] * words), max_tokens=16, temperature=0.5 if words > 9 else 0.0).wait()

        threads = [threading.Thread(target=chat, args=(n, w)) for n, w in (("b", 3), ("c", 12), ("e", 40))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with d.client() as c:
            assert all(c.show(n)["agent"]["messages"] == 2 for n in ("b", "c", "e"))
        assert kernel_files(cache_home) == compiled
        assert "GPU kernels warm in" in d.stderr()
        d.stop()
        d.start(timeout=START_TIMEOUT_S)
        with d.client() as c:
            reserve = c.status()["memory"]["restore_reserve"]
            r = c.chat("a", "And now?", max_tokens=4).wait()
        # Memory for the restores of the 4 agents used last was made ready before the socket.
        assert reserve["agents"] == 4 and reserve["bytes"] > 0, reserve
        assert r["cache_source"] == "disk"
        assert r["cached_tokens"] > 1000 and r["prefilled_tokens"] < 40  # only the new turn
        assert before["messages"] == 12
    finally:
        d.kill()



def _rows(layer) -> list:
    """A full-attention layer's arrays: keys and values, or their quantized triples."""
    return [*layer.keys, *layer.values] if isinstance(layer.keys, tuple) else [layer.keys, layer.values]


def _host(a: mx.array):
    import numpy as np

    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def test_a_restore_reaches_the_gpu_by_dma_bit_for_bit(tiny_4bit_dir, home):
    """Blocks and tail are read into pinned memory and copied to the GPU by the copy engine
    (agentd.cuda_copy): the restored cache equals the saved one, and the next turn after the
    restore answers exactly as a twin whose cache never left memory."""
    import numpy as np

    from agentd import cuda_copy
    from agentd.agents import AgentStore
    from agentd.engine import Engine
    from agentd.kvstore import KVSettings

    for bits in (None, 8):
        engine = Engine(tiny_4bit_dir, kv_bits=bits)
        store = AgentStore(home / f"bits-{bits}", engine, kv=KVSettings(bits, 64, block_tokens=16))
        for name in ("a", "twin"):
            store.create(name, "", "You are a technical specialist. " * 20)
            store.chat(name, "The payment API returns a 500 error.", max_tokens=9)
            if len(store._hot[name].tokens) % 16 == 0:  # a tail too, not only blocks
                store.chat(name, "Fine, go on.", max_tokens=3)
            store.save(name)
        hot = store._hot["a"]
        loaded = store.repo.load("a")
        assert loaded.tokens == hot.tokens and len(hot.tokens) % 16 and len(hot.tokens) > 3 * 16  # blocks + tail
        n = len(hot.tokens)
        for want, got in zip(hot.cache, loaded.cache):
            assert want.offset == got.offset == n
            for x, y in zip(_rows(want), _rows(got)):
                assert np.array_equal(_host(x[..., :n, :]), _host(y[..., :n, :]))
        staging = cuda_copy.staging()
        assert staging is not None and staging._made > 0, "the restore did not stage through pinned memory"
        store.evict("a")  # its next turn restores from disk; the twin stays hot
        follow = [store.chat(n, "What should we check first?", max_tokens=12) for n in ("a", "twin")]
        assert follow[0].cache_source == "disk" and follow[1].cache_source == "memory"
        assert follow[0].text == follow[1].text
