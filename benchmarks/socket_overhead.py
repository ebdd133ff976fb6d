"""Issue 5, question 4: what does going through agentd cost in decode speed, against
mlx-lm's `stream_generate` in-process on the same model folder, prompt and max_tokens?

    .venv/bin/python benchmarks/socket_overhead.py [--quick] [--model DIR] [--max-tokens N] [--runs N]

agentd: the real daemon as a subprocess, `Client.chat` over the socket (the agent is reset
before each run, so every run decodes from the same short prompt); decode tokens/s is
measured at the client (generated tokens after the first / time from the first text frame
to the result) and by the daemon (`decode_tokens_per_s`). mlx-lm: this process (started
with the same OpenBLAS preload as the daemon, via `agentd.blas`), `mlx_lm.load` +
`stream_generate`, greedy, timed the same way. Two mlx-lm variants: the weights as loaded
(the folder's 4-bit ones), and after `agentd.device.prepare_for_device` (what agentd's CPU
path does: dequantize to float32; one-row products reach `sgemv`). The headline ratio is
against the variant whose weights match the daemon's, read off `status.model.bytes`; both
are printed. Writes benchmarks/out/socket_overhead.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentd import blas  # noqa: E402

blas.maybe_reexec_with_fast_blas()

import argparse  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "socket_overhead"
PROMPT = "Write a detailed step-by-step guide to baking bread at home, with at least ten numbered steps."


def agentd_runs(model: Path, runs: int, max_tokens: int) -> tuple[list[dict], dict]:
    home = c.short_tmp("adb-so-")
    daemon = c.Daemon(home, model, "--flush-interval", "3600")
    out = []
    try:
        daemon.start()
        with daemon.client() as cl:
            st = cl.status()
            info = {"model": st["model"], "blas": c.process_blas(daemon.pid), "device": st.get("device")}
            cl.create("dec")
            for run in range(runs + 1):  # the first is a warm-up
                cl.reset("dec")
                t0 = time.perf_counter()
                stream = cl.chat("dec", PROMPT, max_tokens=max_tokens, temperature=0.0)
                first = None
                for _ in stream:
                    if first is None:
                        first = time.perf_counter()
                res = stream.wait()
                end = time.perf_counter()
                n = res["generated_tokens"]
                r = {"generated_tokens": n, "daemon_decode_tok_s": res["decode_tokens_per_s"],
                     "client_decode_tok_s": (n - 1) / (end - first) if first and n > 1 and end > first else None,
                     "wall_s": end - t0, "ttft_ms": res["ttft_ms"], "prompt_tokens": res["prompt_tokens"],
                     "text": stream.text}
                if run:
                    out.append(r)
                c.log(f"agentd run {run}{' (warm-up)' if not run else ''}: {n} tokens, "
                      f"client {c.fmt(r['client_decode_tok_s'])} tok/s, daemon {r['daemon_decode_tok_s']} tok/s")
    finally:
        daemon.kill()
        c.rmtree(home)
    return out, info


def mlx_lm_runs(model: Path, runs: int, max_tokens: int, prepared: bool) -> tuple[list[dict], dict]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    m, tokenizer = load(str(model))
    info: dict = {"variant": "prepare_for_device" if prepared else "as loaded"}
    if prepared:
        from agentd import device

        info["plan"] = device.prepare_for_device(m).to_dict()
    from mlx.utils import tree_flatten

    info["weights_bytes"] = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    out = []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        stamps, last = [], None
        for resp in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
            stamps.append(time.perf_counter())
            last = resp
        end = time.perf_counter()
        n = last.generation_tokens
        r = {"generated_tokens": n, "mlx_lm_generation_tps": last.generation_tps,
             "client_decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else None,
             "wall_s": end - t0, "ttft_ms": (stamps[0] - t0) * 1000, "prompt_tokens": len(prompt)}
        if run:
            out.append(r)
        c.log(f"mlx-lm {info['variant']} run {run}{' (warm-up)' if not run else ''}: {n} tokens, "
              f"{c.fmt(r['client_decode_tok_s'])} tok/s")
    del m
    mx.clear_cache()
    return out, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 run: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per side (after one warm-up)")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    max_tokens = 16 if args.quick else args.max_tokens

    t_start = time.perf_counter()
    model = c.resolve_model(args.model)
    a_runs, a_info = agentd_runs(model, runs, max_tokens)
    variants = {}
    for prepared in (False, True):
        try:
            r, i = mlx_lm_runs(model, runs, max_tokens, prepared)
        except ImportError as e:  # no agentd.device in this checkout
            c.log(f"mlx-lm prepared variant skipped: {e}")
            continue
        variants[i["variant"]] = {"runs": r, "info": i,
                                  "decode_tok_s": c.med([x["client_decode_tok_s"] for x in r]),
                                  "wall_s": c.med([x["wall_s"] for x in r]),
                                  "generated_tokens": c.med([x["generated_tokens"] for x in r])}

    a_client = c.med([x["client_decode_tok_s"] for x in a_runs])
    a_daemon = c.med([x["daemon_decode_tok_s"] for x in a_runs])
    a_wall = c.med([x["wall_s"] for x in a_runs])
    a_tokens = c.med([x["generated_tokens"] for x in a_runs])
    # The daemon's weights are dequantized if they take much more memory than the folder's file.
    daemon_bytes = a_info["model"]["bytes"]
    match = min(variants, key=lambda k: abs(variants[k]["info"]["weights_bytes"] - daemon_bytes))
    rows = [("agentd (socket)", c.fmt(a_client), c.fmt(a_daemon), c.fmt(a_wall, 2), int(a_tokens),
             f"{daemon_bytes / 2**20:.0f}", "")]
    for k, v in variants.items():
        rows.append((f"mlx-lm {k}", c.fmt(v["decode_tok_s"]), "", c.fmt(v["wall_s"], 2), int(v["generated_tokens"]),
                     f"{v['info']['weights_bytes'] / 2**20:.0f}",
                     f"{a_client / v['decode_tok_s']:.2f}x" if v["decode_tok_s"] else "-"))
    print()
    print(c.table(rows, ("", "decode tok/s", "daemon tok/s", "wall s", "tokens", "weights MiB", "agentd/this")))
    ratio = a_client / variants[match]["decode_tok_s"] if variants[match]["decode_tok_s"] else None
    print(f"\nmedian of {runs} run(s) after a warm-up; max_tokens {max_tokens}, greedy, prompt of "
          f"{a_runs[0]['prompt_tokens']} tokens; daemon BLAS {a_info['blas']}, this process {blas.mlx_blas()}")
    print(f"headline: agentd decodes at {c.fmt(ratio, 2)}x the speed of mlx-lm in-process with the same weights "
          f"({match}: {c.fmt(a_client)} vs {c.fmt(variants[match]['decode_tok_s'])} tok/s)  "
          f"({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        **a_info, "runs": runs, "max_tokens": max_tokens, "prompt": PROMPT,
        "agentd": {"runs": a_runs, "decode_tok_s": a_client, "daemon_decode_tok_s": a_daemon, "wall_s": a_wall},
        "mlx_lm": variants, "matching_variant": match,
        "headline": {"ratio": ratio, "agentd_tok_s": a_client, "mlx_lm_tok_s": variants[match]["decode_tok_s"]},
        "this_process_blas": blas.mlx_blas(),
        "machine": c.machine_info(),
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
