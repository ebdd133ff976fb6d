"""Issue 5, question 2: after a restart, how much sooner does the first token come when the
agent's cache is restored from disk than when it is rebuilt by prefilling its transcript?

    .venv/bin/python benchmarks/ttft.py [--quick] [--model DIR] [--sizes ...] [--runs N]
                                        [--big-from TOKENS] [--big-runs N]

Through the real daemon over its socket: `python -m agentd` runs as a subprocess on a temp
home. One agent per size gets a system prompt and a first turn of about that many tokens,
prefilled and saved before the daemon starts (benchmarks/_build.py, untimed); then, for
each run, the daemon is (re)started (SIGTERM flushes, a new process starts) and every agent
is asked a short follow-up: its cache comes from disk ("resumed"). "Rebuilt" forks the
agent before any follow-up (`Client.fork`: same system prompt and conversation) and asks it
the first run's follow-up with `rebuild=True` (the daemon ignores the fork's shared blocks),
so the whole transcript is prefilled. Time to
first token is measured at the client (request sent -> first text frame; the detokenizer
may hold one token back) and by the daemon (`ttft_ms`: restore + prefill + first token).
Large sizes take fewer rebuilt runs (`--big-runs`), since each one prefills the whole
context, and a size whose rebuild would exceed `--max-rebuild-s` (judged from the rate of
the last rebuild) is skipped and said so. Prints the ratio per size; writes
benchmarks/out/ttft.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "ttft"
# A transcript, not only a system prompt: a fork of it is "rebuilt" (a fork of a bare system
# prompt would be reported as "new", though it costs the same).
FIRST_TURN = ["Here is the incident log. Acknowledge briefly.", "Acknowledged: I have read the whole log."]
FOLLOW_UPS = [
    "In one sentence: what should we check first?",
    "Which team owns the fix?",
    "What is the single biggest risk now?",
    "Name one metric to watch.",
    "What do we tell customers?",
    "Is a rollback still needed?",
    "Who should be paged next?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {c.QUICK_SIZES}, 1 run: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--sizes", help="comma-separated context sizes in tokens")
    ap.add_argument("--runs", type=int, default=3, help="restarts (resumed runs) and rebuilt runs per size")
    ap.add_argument("--big-from", type=int, default=4096, help="sizes from here take --big-runs rebuilt runs")
    ap.add_argument("--big-runs", type=int, default=1, help="rebuilt runs at large sizes (each prefills it all)")
    ap.add_argument("--max-rebuild-s", type=float, default=600.0,
                    help="skip rebuilt runs at a size whose rebuild would take longer, judged by the last one's rate")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per follow-up")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (c.QUICK_SIZES if args.quick else c.SIZES)
    runs = 1 if args.quick else args.runs
    big_runs = 1 if args.quick else args.big_runs

    t_start = time.perf_counter()
    model = c.resolve_model(args.model)
    tok = c.Tok(model)
    home = c.short_tmp("adb-tt-")
    daemon = c.Daemon(home, model, "--max-hot", "64", "--cache-budget", "64GB", "--min-available", "1MB",
                      "--flush-interval", "3600")
    per: dict[int, dict] = {n: {"target": n, "resumed": [], "rebuilt": []} for n in sizes}
    info: dict = {}
    skipped: dict[int, float] = {}  # size -> the rebuild time it was estimated to take
    rebuilt_runs = {n: big_runs if n >= args.big_from else runs for n in sizes}
    try:
        built = c.build_agents(home / "data", model, [
            {"name": f"s{n}", "role": "incident analyst", "system": c.system_prompt(tok, n - 24), "turns": [FIRST_TURN]}
            for n in sizes])
        for run in range(runs):
            t0 = time.perf_counter()
            daemon.restart() if run else daemon.start()
            restart_s = time.perf_counter() - t0
            with daemon.client() as cl:
                if not run:
                    st = cl.status()
                    info = {"model": st["model"], "daemon_version": st["daemon_version"],
                            "blas": c.process_blas(daemon.pid), "device": st.get("device"), "build": built}
                    c.log(f"agentd pid {daemon.pid} started in {daemon.start_s:.1f} s, BLAS {info['blas']}")
                    # Forked before any follow-up: a rebuilt run sees the transcript the first resumed run sees.
                    for n in sizes:
                        for k in range(rebuilt_runs[n]):
                            cl.fork(f"s{n}", f"f{n}-{k}")
                for n in sizes:
                    r = c.timed_chat(cl, f"s{n}", FOLLOW_UPS[run % len(FOLLOW_UPS)], args.max_tokens)
                    if r["cache_source"] != "disk":
                        raise SystemExit(f"resumed run at {n}: cache came from {r['cache_source']}, not disk")
                    r["restart_s"] = restart_s
                    per[n]["resumed"].append(r)
                    c.log(f"{n}: resumed run {run + 1}: {r['client_ttft_ms']:.0f} ms "
                          f"(restore {r['restore_ms']:.0f} ms, {r['prompt_tokens']} tokens)")
                    cl.evict(f"s{n}")  # written now, so the next restart finds this turn on disk

        rate = None  # tokens/s of the last rebuild: a rebuild at a larger size is at least this slow
        with daemon.client() as cl:
            for n in sorted(sizes):
                if rate and n / rate > args.max_rebuild_s:
                    skipped[n] = n / rate
                    c.log(f"{n}: rebuilt runs skipped: at {rate:.0f} tok/s one would take over {n / rate:.0f} s "
                          f"(--max-rebuild-s {args.max_rebuild_s:g})")
                    continue
                for k in range(rebuilt_runs[n]):
                    fork = f"f{n}-{k}"
                    r = c.timed_chat(cl, fork, FOLLOW_UPS[0], args.max_tokens, rebuild=True)
                    if r["cache_source"] != "rebuilt":
                        raise SystemExit(f"rebuilt run at {n}: cache came from {r['cache_source']}")
                    per[n]["rebuilt"].append(r)
                    rate = r["prefilled_tokens"] / (r["ttft_ms"] / 1000)
                    c.log(f"{n}: rebuilt run {k + 1}/{rebuilt_runs[n]}: {r['client_ttft_ms']:.0f} ms "
                          f"({r['prefilled_tokens']} tokens prefilled)")
                    cl.delete(fork)
    finally:
        daemon.kill()
        log_tail = daemon.stderr()[-2000:]
        c.rmtree(home)

    rows, sizes_out = [], []
    for n in sizes:
        d = per[n]
        res_c = c.med([r["client_ttft_ms"] for r in d["resumed"]])
        reb_c = c.med([r["client_ttft_ms"] for r in d["rebuilt"]])
        res_d = c.med([r["ttft_ms"] for r in d["resumed"]])
        reb_d = c.med([r["ttft_ms"] for r in d["rebuilt"]])
        restore = c.med([r["restore_ms"] for r in d["resumed"]])
        tokens = c.med([r["prompt_tokens"] for r in d["resumed"]])
        reb_tokens = c.med([r["prompt_tokens"] for r in d["rebuilt"]])
        ratio = reb_c / res_c if res_c and reb_c else None
        sizes_out.append({
            "target": n, "prompt_tokens": tokens, "rebuilt_prompt_tokens": reb_tokens,
            "resumed_client_ttft_ms": res_c, "rebuilt_client_ttft_ms": reb_c,
            "resumed_daemon_ttft_ms": res_d, "rebuilt_daemon_ttft_ms": reb_d,
            "restore_ms": restore, "ratio": ratio,
            "resumed_runs": len(d["resumed"]), "rebuilt_runs": len(d["rebuilt"]),
            "runs": {"resumed": d["resumed"], "rebuilt": d["rebuilt"]},
        })
        rows.append((int(tokens), c.fmt(res_c, 0), c.fmt(restore, 0), c.fmt(reb_c, 0),
                     f"{c.fmt(ratio)}x" if ratio else "-", f"{len(d['resumed'])}/{len(d['rebuilt'])}"))
    print()
    print(c.table(rows, ("tokens", "resumed ms", "(restore ms)", "rebuilt ms", "rebuilt/resumed", "runs res/reb")))
    print(f"\nclient-side time to first token after a daemon restart, median; model {info.get('model', {}).get('id')}, "
          f"BLAS {info.get('blas')}. Rebuilt runs at >= {args.big_from} tokens: {big_runs} (each prefills it all).")
    best = max((s for s in sizes_out if s["ratio"]), key=lambda s: s["target"], default=None)
    if best:
        print(f"headline: at {int(best['prompt_tokens'])} tokens the first token comes {best['ratio']:.1f}x sooner "
              f"resumed from disk ({best['resumed_client_ttft_ms']:.0f} ms) than rebuilt "
              f"({best['rebuilt_client_ttft_ms']:.0f} ms)  ({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        **info,
        "runs": runs, "rebuilt_runs": rebuilt_runs, "max_rebuild_s": args.max_rebuild_s,
        "rebuilt_skipped_estimated_s": skipped, "big_from": args.big_from, "big_runs": big_runs, "max_tokens": args.max_tokens,
        "sizes": sizes_out,
        "machine": c.machine_info(),
        "daemon_log_tail": log_tail,
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
