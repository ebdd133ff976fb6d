"""agentd.warmup: when the GPU kernels are warmed, which shapes, where MLX keeps them.

The warm-up itself runs on CUDA only (tests/test_cuda.py checks that it leaves nothing to
compile); here its decisions are tested as functions and its passes run on the CPU."""

from __future__ import annotations

from pathlib import Path


from agentd import warmup
from agentd.backend import CPU, CUDA, METAL
from agentd.engine import Engine
from agentd.protocol import Sampling
from agentd.stepper import generate


def test_warm_only_on_cuda_unless_switched_off():
    assert warmup.should_warm(CUDA, {})
    assert not warmup.should_warm(CPU, {}) and not warmup.should_warm(METAL, {})
    for off in ("off", "0", "no", "FALSE"):
        assert not warmup.should_warm(CUDA, {warmup.SWITCH_ENV: off})


def test_kernel_cache_goes_to_agentd_cache_dir_unless_the_user_chose(tmp_path):
    chosen = warmup.ptx_cache_dir({}, tmp_path, "0.32.4")
    assert chosen == tmp_path / "mlx-ptx" / "0.32.4"
    assert warmup.ptx_cache_dir({warmup.PTX_ENV: "/somewhere"}, tmp_path, "0.32.4") is None


def test_lengths_cover_every_power_of_two_up_to_the_chunk():
    lengths = warmup.warm_lengths(2048)
    assert lengths[0] == 2048 and lengths[-1] == 2048  # over an empty cache and a full one
    assert set(lengths[1:-1]) == {2**i for i in range(11)}


def test_warm_up_runs_the_model_and_leaves_it_unchanged(tiny_llama_dir: Path):
    engine = Engine(tiny_llama_dir)
    engine.prefill_chunk = 16  # the tiny model on the CPU: keep it quick
    prompt = engine.render("sys", [{"role": "user", "content": "Hello! How are you today?"}])
    before = generate(engine, engine.new_cache(), [], prompt, Sampling(max_tokens=6))[1]
    report = warmup.warm_up(engine)
    assert report.lengths == (16, 1, 2, 4, 8, 16) and report.seconds > 0
    # The concurrent phase: at least as many steps as its longest turn's prefill and reply.
    assert report.passes >= len(report.lengths) + max(m for _, m, _ in warmup.CONCURRENT_TURNS)
    assert report.max_batch >= 4  # the turns decoded together, as concurrent agents do
    assert report.to_dict()["lengths"] == list(report.lengths)
    after = generate(engine, engine.new_cache(), [], prompt, Sampling(max_tokens=6))[1]
    assert after.tokens == before.tokens
