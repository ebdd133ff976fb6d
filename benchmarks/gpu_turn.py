"""Where a resumed turn's time goes on an NVIDIA GPU, in one process with agentd's own parts.

    python benchmarks/gpu_turn.py [--model llama-8b] [--contexts 8192,32768] [--out FILE]

The daemon reports a resumed turn's time to first token as restore + the rest; on the H200
the rest (a prefill of ~85 tokens and the first token) took 110-170 ms, several times what
the same model's prefill rate gives for 85 tokens. This splits it, with agentd's Engine,
warm-up and AgentStore (no socket): for each context an agent takes a first turn, is saved
and evicted, and answers follow-ups restored from disk; each follow-up's prefill is timed
with MLX's peak memory over it (a copy of the whole cache shows as a peak of about its
size), then a follow-up with the cache still hot. Then forward passes of L new tokens on
the hot cache, each length twice (first seen, again), time to the end of the pass, with
short prefills' attention composed (agentd.gpu_attention, as the daemon runs) and through
MLX's fused kernel (cuDNN), one after the other in the same process.
Models: benchmarks/gpu_models.py (random 4-bit weights of real shapes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

LENGTHS = (1, 8, 32, 64, 83, 128, 256, 512)
QUESTIONS = ["Which service failed first, and when? Give the time and the component in one sentence.",
             "Who should be paged about the replica lag, and what should they check before anything else?",
             "Summarize the customer impact so far in two sentences for the status page update.",
             "What is the single most likely root cause, and which log line supports it best?"]


def _timed_prefill(stats: list) -> None:
    """Wrap Sequence.prefill to record its time and MLX's peak memory over it."""
    import mlx.core as mx

    from agentd import sequence

    real = sequence.Sequence.prefill

    def prefill(self, budget):
        mx.synchronize()
        active = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        n = real(self, budget)
        mx.synchronize()
        stats.append({"tokens": n, "ms": (time.perf_counter() - t0) * 1000,
                      "peak_over_active_mb": (mx.get_peak_memory() - active) / 1e6,
                      "cache_mb": sum(l.keys.nbytes + l.values.nbytes for l in self.cache
                                      if getattr(l, "keys", None) is not None) / 1e6})
        return n

    sequence.Sequence.prefill = prefill


def turn(store, name: str, message: str, stats: list, max_tokens: int = 8) -> dict:
    before = len(stats)
    t0 = time.perf_counter()
    r = store.chat(name, message, max_tokens=max_tokens)
    wall = (time.perf_counter() - t0) * 1000
    d = r.to_dict() if hasattr(r, "to_dict") else dict(r.__dict__)
    keep = {k: d.get(k) for k in ("cache_source", "cached_tokens", "prefilled_tokens", "restore_ms", "ttft_ms")}
    keep["prefill_calls"] = stats[before:]
    keep["wall_ms"] = wall
    return keep


def forward_lengths(engine, cache, n_cached: int, label: str, seed: int = 0) -> list[dict]:
    import mlx.core as mx

    from mlx_lm.models.cache import trim_prompt_cache

    out = []
    for L in LENGTHS:
        row = {"tokens": L, "attention": label}
        for when in ("first", "again"):
            ids = [(seed + n_cached + i) % 1000 for i in range(L)]
            mx.synchronize()
            t0 = time.perf_counter()
            logits = engine.last_logits(ids, cache)
            mx.eval(logits, [l.state for l in cache])
            row[f"{when}_ms"] = (time.perf_counter() - t0) * 1000
            trim_prompt_cache(cache, L)
        out.append(row)
        c.log(f"  forward {L} tokens at {n_cached} ({label}): {row}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--models-dir", default="/tmp/agentd-gpu-models")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--restores", type=int, default=3)
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / "gpu_turn.json")
    args = ap.parse_args()
    model_dir = Path(args.models_dir) / args.model
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_models.py")), args.model, str(model_dir)],
                       check=True, timeout=600)
    import logging

    import mlx.core as mx

    from agentd.agents import AgentStore
    from agentd.engine import Engine
    from agentd.warmup import use_persistent_ptx_cache, warm_up

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_persistent_ptx_cache()
    engine = Engine(model_dir)
    c.log(f"device plan: {engine.plan}")
    t0 = time.perf_counter()
    report = warm_up(engine, 256, 16)
    c.log(f"warm-up {time.perf_counter() - t0:.1f}s")
    tok = c.Tok(model_dir)
    home = Path(tempfile.mkdtemp(prefix="gputurn-"))
    store = AgentStore(home, engine)
    stats: list = []
    _timed_prefill(stats)
    data = {"machine": c.machine_info(), "model": args.model, "warmup_s": report.seconds, "contexts": {}}
    for n in [int(x) for x in args.contexts.split(",")]:
        name = f"a{n}"
        store.create(name, system=tok.text_of_length(n - 40))
        ctx = {"first": turn(store, name, "Here is the incident log. Acknowledge briefly.", stats)}
        ctx["restored"], ctx["hot"] = [], []
        for i in range(args.restores):
            store.evict(name)  # saves, drops the cache; the next turn restores it from disk
            ctx["restored"].append(turn(store, name, QUESTIONS[i % len(QUESTIONS)], stats))
            ctx["hot"].append(turn(store, name, QUESTIONS[(i + 1) % len(QUESTIONS)], stats))
            c.log(f"{n}: restored {ctx['restored'][-1]}\n    hot {ctx['hot'][-1]}")
        agent = store.hot.get(name)
        sdpa = mx.fast.scaled_dot_product_attention
        fused = getattr(sdpa, "fused", None)
        ctx["forward"] = forward_lengths(engine, agent.cache, len(agent.tokens),
                                         "composed" if fused else "mlx")
        if fused is not None:  # the same passes through MLX's own kernel (cuDNN on CUDA)
            mx.fast.scaled_dot_product_attention = fused
            try:
                ctx["forward_mlx"] = forward_lengths(engine, agent.cache, len(agent.tokens), "mlx", seed=500)
            finally:
                mx.fast.scaled_dot_product_attention = sdpa
        data["contexts"][str(n)] = ctx
        c.write_json(args.out, data)
        store.evict(name)
        mx.clear_cache()
    c.write_json(args.out, data)


if __name__ == "__main__":
    main()
