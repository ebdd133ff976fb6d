"""Issue 11b: few-row products on the CPU, from one product to a daemon's follow-up turn.

    .venv/bin/python benchmarks/few_rows.py [--quick] [--runs N] [--parts products,forward,restart]
        [--model DIR] [--out FILE]

Three parts, each in its own process(es), in one run:

1. **Products.** The default model's weight shapes (576x576 q/o, 576x192 k/v, 576x1536 gate/up,
   1536x576 down, the 576x49,152 tied embedding) times m = 1..64 rows, as MLX issues them
   (`x @ W.T`: row-major, B transposed), timed through three `cblas_sgemm`s called with ctypes in
   one process: Debian's OpenBLAS, numpy's bundled newer OpenBLAS (`scipy_cblas_sgemm64_`) and
   agentd's kernel (`daemon/gemv_forward.c`, told by `agentd_few_rows_max` to take every m
   shown; agentd itself stops at `MAX_ROWS`). Weights are cycled through copies
   totalling 256 MiB, so each call reads them from memory as a forward pass does. Prints time,
   GFLOP/s and the weight bytes read per second beside the machine's memory copy rate.
2. **Forward pass.** The default model in-process (agentd's CPU path) with ~725 tokens of
   context: one forward pass of m = 1, 2, 4, 8, 16, 24, 32 new tokens, median of --runs rounds,
   in one process that alternates between agentd's CPU path as it ships, the same with MLX's
   attention and SwiGLU in place of agentd's few-row ones (`agentd.fewattn`), and the forwarder
   taking one-row products only (every product of 2 or more rows goes to OpenBLAS, as before
   issue 11b; MLX's attention), so all three see the same machine load.
3. **Restart follow-up.** The real daemon over its socket: each of --runs agents, created with
   a ~700-token system prompt, is asked its first turn (whole prompt prefilled) in a freshly
   started daemon; then, after a restart, a follow-up (cache restored from disk, ~20 new
   tokens). Time to first token at the client; the ratio first turn / follow-up is the
   headline, with the daemon's own restore and prefill figures beside it.

Writes benchmarks/out/few_rows.json.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "few_rows"
SHAPES = [  # (n, k): W is n x k, the product is x (m x k) @ W.T
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("embedding 49152x576", 49152, 576),
]
PRODUCT_ROWS = [1, 2, 4, 8, 16, 24, 32, 64]
FORWARD_ROWS = [1, 2, 4, 8, 16, 24, 32]
CONTEXT = 725
FIRST_TURN = "Here is the incident log. Read it and acknowledge briefly."
FOLLOW_UP = "In one sentence: what should we check first?"
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


# --- processes -------------------------------------------------------------------------------


def preload_env(forwarder: str | None) -> dict[str, str]:
    """agentd's re-exec environment, with `forwarder` in front of OpenBLAS (None: OpenBLAS alone)."""
    from agentd import blas

    library = blas.find_openblas()
    if library is None:
        sys.exit("few_rows.py needs a system OpenBLAS (make setup installs libopenblas0-pthread)")
    env = dict(os.environ)
    env.pop(blas.ENV_MARKER, None)
    env["LD_PRELOAD"] = f"{forwarder}:{library}" if forwarder else library
    env[blas.ENV_MARKER] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", str(blas.default_threads()))
    return env


def run_worker(part: str, env: dict[str, str], args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", part, "--runs", str(args.runs), *extra]
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", str(args.model)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=str(c.ROOT))
    if proc.returncode != 0:
        sys.exit(f"{part} worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- part 1: products (worker) ------------------------------------------------------------


def _sgemm(lib, name: str, wide: bool):
    fn = getattr(lib, name)
    i = ctypes.c_int64 if wide else ctypes.c_int
    p, f = ctypes.c_void_p, ctypes.c_float
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    fn.restype = None
    return fn


def products_worker(runs: int, quick: bool) -> dict:
    import numpy as np

    from agentd import blas

    preload = os.environ["LD_PRELOAD"].split(":")
    forwarder = ctypes.CDLL(preload[0])
    forwarder.agentd_few_rows_max(ctypes.c_int(max(PRODUCT_ROWS)))  # the kernel takes every m here
    kernel = _sgemm(forwarder, "cblas_sgemm", False)
    openblas = _sgemm(ctypes.CDLL(preload[1]), "cblas_sgemm", False)
    numpy_libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so*"))
    scipy = None
    for path in numpy_libs:
        lib = ctypes.CDLL(path)
        for name, wide in (("scipy_cblas_sgemm64_", True), ("scipy_cblas_sgemm", False)):
            if hasattr(lib, name):
                scipy = _sgemm(lib, name, wide)
                break
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    if scipy is not None:  # the same thread count as the other two
        for path in numpy_libs:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
                if hasattr(lib, name):
                    getattr(lib, name)(ctypes.c_int(threads))
    impls = {"openblas": openblas, "numpy_openblas": scipy, "agentd": kernel}
    impls = {k: v for k, v in impls.items() if v is not None}

    x = np.ones(256 * 2**20 // 4, dtype=np.float32)
    y = np.empty_like(x)
    copy = [0.0]

    def best(f, n=5):
        ts = []
        for _ in range(n):
            s = time.perf_counter()
            f()
            ts.append(time.perf_counter() - s)
        return min(ts)

    copy_gbs = 2 * x.nbytes / best(lambda: np.copyto(y, x)) / 1e9
    read_gbs = x.nbytes / best(lambda: x.sum()) / 1e9
    del x, y, copy

    rows_list = [1, 4, 16] if quick else PRODUCT_ROWS
    shapes = SHAPES[:2] if quick else SHAPES
    rng = np.random.default_rng(0)
    results = []
    for label, n, k in shapes:
        wbytes = n * k * 4
        copies = max(2, (256 * 2**20) // wbytes) if not quick else 2
        weights = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
        for m in rows_list:
            a = rng.standard_normal((m, k), dtype=np.float32)
            out = np.empty((m, n), dtype=np.float32)
            calls = max(copies, 4 if wbytes > 2**24 else 12)  # the embedding: a few calls suffice
            times: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(runs):
                for name, fn in impls.items():  # interleaved: load changes hit all three
                    s = time.perf_counter()
                    for i in range(calls):
                        fn(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, a.ctypes.data, k,
                           weights[i % copies].ctypes.data, k, 0.0, out.ctypes.data, n)
                    times[name].append((time.perf_counter() - s) / calls)
            row = {"shape": label, "n": n, "k": k, "m": m, "weight_bytes": wbytes}
            for name, ts in times.items():
                t = statistics.median(ts)
                row[name] = {"us": t * 1e6, "gflops": 2 * m * n * k / t / 1e9, "gbs": wbytes / t / 1e9}
            results.append(row)
            print(f"{label:>20} m={m:>2}  " + "  ".join(
                f"{name} {row[name]['us']:8.1f} us {row[name]['gbs']:5.1f} GB/s {row[name]['gflops']:5.1f} GF/s"
                for name in impls), file=sys.stderr)
        del weights
    return {
        "impls": list(impls),
        "threads": threads,
        "copy_gb_s_read_plus_write": copy_gbs,
        "read_gb_s_numpy_sum": read_gbs,
        "products": results,
        "forwarder": preload[0],
        "blas": blas.mlx_blas(),
    }


# --- part 2: forward passes (worker) --------------------------------------------------------


def forward_worker(runs: int, quick: bool, model_dir: str | None) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    from agentd import blas, device, fewattn

    model, _ = mlx_lm.load(str(c.resolve_model(model_dir)))
    plan = device.prepare_for_device(model)
    vocab = model.args.vocab_size
    context = 64 if quick else CONTEXT
    ids = mx.random.randint(3, vocab, (1, context), key=mx.random.key(1))
    cache = make_prompt_cache(model)
    for i in range(0, context, plan.prefill_chunk):
        model(ids[:, i : i + plan.prefill_chunk], cache=cache)
        mx.eval([layer.state for layer in cache])
    forwarder = ctypes.CDLL(next(p for p in os.environ["LD_PRELOAD"].split(":") if blas.FORWARD_STEM in p))
    shipped = forwarder.agentd_few_rows_max(ctypes.c_int(-1))
    attention_rows = fewattn.MAX_QUERY_ROWS
    # (rows the product kernel takes, rows agentd's attention takes); 0: MLX's attention.
    modes = {"agentd": (shipped, attention_rows), "mlx_attention": (shipped, 0), "one_row_only": (1, 0)}
    times = {mode: {m: [] for m in FORWARD_ROWS} for mode in modes}
    for _ in range(runs + 1):  # the first round warms up and is dropped
        for mode, (rows, attention) in modes.items():
            forwarder.agentd_few_rows_max(ctypes.c_int(rows))
            fewattn.MAX_QUERY_ROWS = attention
            for m in FORWARD_ROWS:
                toks = mx.random.randint(3, vocab, (1, m), key=mx.random.key(m))
                mx.eval(toks)
                s = time.perf_counter()
                mx.eval(model(toks, cache=cache))
                times[mode][m].append(time.perf_counter() - s)
                for layer in cache:
                    layer.trim(m)
    forwarder.agentd_few_rows_max(ctypes.c_int(shipped))
    fewattn.MAX_QUERY_ROWS = attention_rows
    return {
        "context": context,
        "plan": plan.to_dict(),
        "max_rows": shipped,
        "modes": {
            mode: {
                "ms": {str(m): statistics.median(ts[1:]) * 1e3 for m, ts in per.items()},
                "runs_ms": {str(m): [round(t * 1e3, 2) for t in ts[1:]] for m, ts in per.items()},
            }
            for mode, per in times.items()
        },
        "load_avg": os.getloadavg(),
    }


# --- part 3: restart follow-up over the socket ----------------------------------------------


def restart_follow_up(args) -> dict:
    model = c.resolve_model(args.model)
    tok = c.Tok(model)
    home = c.short_tmp("adb-fr-")
    daemon = c.Daemon(home, model, "--max-hot", "64", "--flush-interval", "3600")
    context = 128 if args.quick else CONTEXT - 25
    first, follow = [], []
    try:
        for i in range(args.runs):
            daemon.restart() if i else daemon.start()
            with daemon.client() as cl:
                # Each agent's log starts with its own name: the block store shares cache blocks
                # of a common prefix, and a first turn that loaded another agent's blocks would
                # not be the whole-prompt prefill this compares with.
                cl.create(f"a{i}", role="incident analyst",
                          system=f"Incident log of agent a{i}. " + c.system_prompt(tok, context - 32))
                r = c.timed_chat(cl, f"a{i}", FIRST_TURN, args.max_tokens)
                first.append(r)
                c.log(f"agent a{i}: first turn {r['client_ttft_ms']:.0f} ms to the first token "
                      f"({r['prefilled_tokens']} tokens prefilled)")
            if r["cached_tokens"]:
                raise SystemExit(f"first turn of a{i}: {r['cached_tokens']} tokens came from a cache")
        for i in range(args.runs):
            daemon.restart()
            with daemon.client() as cl:
                r = c.timed_chat(cl, f"a{i}", FOLLOW_UP, args.max_tokens)
                if r["cache_source"] != "disk":
                    raise SystemExit(f"follow-up of a{i}: cache came from {r['cache_source']}, not disk")
                follow.append(r)
                c.log(f"agent a{i}: follow-up after a restart {r['client_ttft_ms']:.0f} ms "
                      f"(restore {r['restore_ms']:.0f} ms, {r['prefilled_tokens']} tokens prefilled, "
                      f"{r['cached_tokens']} cached)")
        blas_name = c.process_blas(daemon.pid)
    finally:
        daemon.kill()
        log_tail = daemon.stderr()[-2000:]
        c.rmtree(home)
    keep = ("client_ttft_ms", "ttft_ms", "restore_ms", "prefilled_tokens", "cached_tokens", "prompt_tokens",
            "cache_source")
    first_ms = c.med([r["client_ttft_ms"] for r in first])
    follow_ms = c.med([r["client_ttft_ms"] for r in follow])
    return {
        "blas": blas_name,
        "first_turn_client_ttft_ms": first_ms,
        "follow_up_client_ttft_ms": follow_ms,
        "ratio": first_ms / follow_ms,
        "first_turn_daemon_ttft_ms": c.med([r["ttft_ms"] for r in first]),
        "follow_up_daemon_ttft_ms": c.med([r["ttft_ms"] for r in follow]),
        "follow_up_restore_ms": c.med([r["restore_ms"] for r in follow]),
        "first_turn_prefilled": c.med([r["prefilled_tokens"] for r in first]),
        "follow_up_prefilled": c.med([r["prefilled_tokens"] for r in follow]),
        "follow_up_cached": c.med([r["cached_tokens"] for r in follow]),
        "first_turns": [{k: r.get(k) for k in keep} for r in first],
        "follow_ups": [{k: r.get(k) for k in keep} for r in follow],
        "daemon_log_tail": log_tail,
    }


# --- orchestration ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["products", "forward"])
    ap.add_argument("--quick", action="store_true", help="few shapes, tiny context, one run: a smoke test")
    ap.add_argument("--runs", type=int, default=5, help="rounds per measurement; agents in part 3")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn in part 3")
    ap.add_argument("--parts", default="products,forward,restart", help="which parts to run (comma-separated)")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
    if args.worker == "products":
        print(json.dumps(products_worker(args.runs, args.quick)))
        return
    if args.worker == "forward":
        print(json.dumps(forward_worker(args.runs, args.quick, args.model)))
        return

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    from agentd import blas

    forwarder = blas.build_gemv_forward()
    if forwarder is None:
        sys.exit("few_rows.py needs a C compiler: the forwarder is what it measures")
    parts = set(args.parts.split(","))
    products = forward = restart = None
    if "products" in parts:
        c.log("part 1: products")
        products = run_worker("products", preload_env(forwarder), args)
    if "forward" in parts:
        c.log("part 2: forward passes")
        forward = run_worker("forward", preload_env(forwarder), args)
        for label, mode in forward["modes"].items():
            c.log(f"  {label}: " + ", ".join(f"{m} rows {t:.1f} ms" for m, t in mode["ms"].items()))
    if "restart" in parts:
        c.log("part 3: restart follow-up over the socket")
        restart = restart_follow_up(args)

    goals = {}
    if products:
        print()
        rows = []
        for p in products["products"]:
            rows.append((p["shape"], p["m"], *(f"{p[i]['us']:.0f}" for i in products["impls"]),
                         *(f"{p[i]['gbs']:.1f}" for i in products["impls"]),
                         f"{p['agentd']['gflops']:.1f}"))
        impls = products["impls"]
        print(c.table(rows, ("product", "m", *(f"{i} us" for i in impls), *(f"{i} GB/s" for i in impls),
                             "agentd GF/s")))
        print(f"machine: memory copy {products['copy_gb_s_read_plus_write']:.1f} GB/s (read + write), "
              f"numpy sum reads {products['read_gb_s_numpy_sum']:.1f} GB/s; {products['threads']} BLAS threads")
    if forward:
        print()
        rows = []
        for label, mode in forward["modes"].items():
            ms = mode["ms"]
            rows.append((label, *(f"{t:.1f}" for t in ms.values()),
                         *(f"{ms[str(m)] / ms['1']:.2f}x" for m in (4, 16))))
        print(c.table(rows, ("forward pass ms", *(f"{m} tok" for m in FORWARD_ROWS), "4/1", "16/1")))
        print(f"(~{forward['context']} tokens of context, median of {args.runs} rounds alternating the three; "
              f"agentd's forwarder takes up to {forward['max_rows']} rows)")
        f = forward["modes"]["agentd"]["ms"]
        goals["forward_4_over_1_at_most_1.5"] = f["4"] / f["1"] <= 1.5
    if restart:
        print()
        print(f"restart follow-up: first turn {restart['first_turn_client_ttft_ms']:.0f} ms to the first token "
              f"({restart['first_turn_prefilled']:.0f} tokens), follow-up after a restart "
              f"{restart['follow_up_client_ttft_ms']:.0f} ms (restore {restart['follow_up_restore_ms']:.0f} ms, "
              f"{restart['follow_up_prefilled']:.0f} tokens prefilled on {restart['follow_up_cached']:.0f} cached): "
              f"{restart['ratio']:.1f}x sooner")
        goals["follow_up_20x_sooner"] = restart["ratio"] >= 20
    print(f"done-when: {goals}  ({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "argv": [Path(__file__).name, *sys.argv[1:]],
        "products": products,
        "forward": forward,
        "restart": restart,
        "goals": goals,
        "parts": sorted(parts),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "machine": c.machine_info(),
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
