"""Issue 11: many agents at once through the scheduler, against the same turns one after another.

    .venv/bin/python benchmarks/concurrency.py [--quick] [--runs N] [--model DIR] [--out FILE]

Two parts, one real daemon (default model), over its socket:

1. **Batched decode.** For N = 1, 2, 3, 4, 8 agents (each warmed with a first turn, so the
   measured turns are decode-bound), every agent is asked for a --max-tokens reply: once all
   at once (N client threads released together) and once one after another, interleaved
   (A/B, then B/A in the next run) so machine load falls on both. Wall time and aggregate
   decode tokens/s (generated tokens of all N turns / wall time); the ratio serial / at once
   is the speed-up: of the medians over --runs, and the median of each run's own ratio (its
   two measurements taken side by side).
2. **A short turn beside a long prefill.** Agent `long` is sent a ~--long-tokens message (a
   fresh prefill: the agent is reset first); once its prefill is under way, agent `short`
   (warm) is asked a one-line question (--short-tokens reply). Reported: the short turn's
   time to its result, the long turn's time, their ratio, and both alone.

3. **Greedy agreement.** --agree-agents agents and as many twins (same system prompt, no
   turn yet): the agents are asked one question at once (their turns batched), the twins
   the same question one after another (each alone). Counted: replies that are token-exact,
   and where the others first part.

Writes benchmarks/out/concurrency.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "concurrency"
SYSTEM = "You are a support engineer, agent {i}."
# Asks for a long answer: every turn runs to --max-tokens (a turn that stops early would
# make the batch smaller than N for its last steps).
QUESTION = "Describe in detail, in several paragraphs, what can cause a payment API to return error 500 ({i})."


def timed(d: c.Daemon, name: str, message: str, max_tokens: int) -> dict:
    with d.client() as cl:
        return c.timed_chat(cl, name, message, max_tokens)


def at_once(d: c.Daemon, names: list[str], max_tokens: int, run: int) -> dict:
    results: list = [None] * len(names)
    go = threading.Barrier(len(names) + 1)

    def one(i: int, name: str) -> None:
        with d.client() as cl:
            cl.ping()  # connected and greeted before the start line
            go.wait()
            results[i] = c.timed_chat(cl, name, QUESTION.format(i=f"ticket {name}-{run}"), max_tokens)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "generated": sum(r["generated_tokens"] for r in results), "turns": results}


def one_after_another(d: c.Daemon, names: list[str], max_tokens: int, run: int) -> dict:
    t0 = time.perf_counter()
    results = [timed(d, n, QUESTION.format(i=f"ticket {n}-{run}"), max_tokens) for n in names]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "generated": sum(r["generated_tokens"] for r in results), "turns": results}


def batched_decode(d: c.Daemon, ns: list[int], runs: int, max_tokens: int) -> list[dict]:
    names = [f"a{i}" for i in range(max(ns))]
    with d.client() as cl:
        for i, n in enumerate(names):
            cl.create(n, system=SYSTEM.format(i=i))
            cl.chat(n, QUESTION.format(i="warm-up"), max_tokens=4).wait()  # the system prompt is prefilled now
    rows = []
    for n in ns:
        serial, concurrent = [], []
        for r in range(runs):
            order = [("serial", one_after_another), ("at_once", at_once)]
            if r % 2:
                order.reverse()
            for kind, fn in order:
                out = fn(d, names[:n], max_tokens, r)
                (serial if kind == "serial" else concurrent).append(out)
                c.log(f"N={n} run {r} {kind}: {out['wall_s']:.2f} s, {out['generated']} tokens")
        s_wall = statistics.median(x["wall_s"] for x in serial)
        a_wall = statistics.median(x["wall_s"] for x in concurrent)
        s_tps = statistics.median(x["generated"] / x["wall_s"] for x in serial)
        a_tps = statistics.median(x["generated"] / x["wall_s"] for x in concurrent)
        # Each run's two measurements are next to each other in time and in context length (every
        # run adds a turn to each agent, so later runs are slower): their ratio, one a run, is the
        # speed-up least moved by the machine's drift and the growing context; "speedup" is the
        # ratio of the two medians, as before.
        paired = statistics.median(s["wall_s"] / a["wall_s"] for s, a in zip(serial, concurrent))
        rows.append({"agents": n, "serial_wall_s": s_wall, "at_once_wall_s": a_wall, "serial_tok_s": s_tps,
                     "at_once_tok_s": a_tps, "speedup": s_wall / a_wall, "speedup_paired": paired,
                     "generated_per_run": statistics.median(x["generated"] for x in concurrent),
                     "serial_runs": [x["wall_s"] for x in serial], "at_once_runs": [x["wall_s"] for x in concurrent]})
    with d.client() as cl:
        scheduler = cl.status()["scheduler"]
    return rows, scheduler


def short_beside_long(d: c.Daemon, tok: c.Tok, runs: int, long_tokens: int, short_tokens: int) -> dict:
    long_msg = tok.text_of_length(long_tokens)
    short_q = "In one word: is the fix urgent?"
    with d.client() as cl:
        cl.create("long", system="You summarise incident logs.")
        cl.create("short", system="You answer in one word.")
        cl.chat("short", "Ready?", max_tokens=2).wait()
    out = {"long_alone_s": [], "short_alone_s": [], "long_with_short_s": [], "short_beside_long_s": [],
           "short_sent_after_s": []}
    for r in range(runs):
        with d.client() as cl:
            cl.reset("long")
        t = timed(d, "long", long_msg, 1)
        out["long_alone_s"].append(t["client_total_ms"] / 1000)
        out["prompt_tokens"] = t["prompt_tokens"]
        out["short_alone_s"].append(timed(d, "short", short_q, short_tokens)["client_total_ms"] / 1000)
        with d.client() as cl:
            cl.reset("long")
        started = threading.Event()
        long_res: dict = {}

        def long_turn():
            with d.client() as cl:
                t0 = time.perf_counter()
                stream = cl.chat("long", long_msg, max_tokens=1,
                                 on_progress=lambda done, total: started.set() if done > 0 else None)
                stream.wait()
                long_res["s"] = time.perf_counter() - t0
                long_res["t0"] = t0

        th = threading.Thread(target=long_turn)
        th.start()
        started.wait(600)  # the first prefill chunk is done: the long prefill is under way
        time.sleep(0.5)  # and the next chunk has begun
        t_send = time.perf_counter()
        short = timed(d, "short", short_q, short_tokens)
        th.join()
        out["short_beside_long_s"].append(short["client_total_ms"] / 1000)
        out["long_with_short_s"].append(long_res["s"])
        out["short_sent_after_s"].append(t_send - long_res["t0"])
        c.log(f"prefill run {r}: long alone {out['long_alone_s'][-1]:.1f} s, with the short turn "
              f"{long_res['s']:.1f} s; short alone {out['short_alone_s'][-1]:.2f} s, beside it "
              f"{out['short_beside_long_s'][-1]:.2f} s")
    summary = {k + "_median": statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    summary["short_over_long"] = summary["short_beside_long_s_median"] / summary["long_with_short_s_median"]
    return {**out, **summary}


def agreement(d: c.Daemon, k: int, max_tokens: int) -> dict:
    names = [f"g{i}" for i in range(k)]
    with d.client() as cl:
        for i, n in enumerate(names):
            for who in (n, n + "-alone"):
                cl.create(who, system=f"You are a support engineer. Your ticket queue is number {i}.")
    batched = at_once(d, names, max_tokens, "agree")["turns"]
    alone = [timed(d, n + "-alone", QUESTION.format(i=f"ticket {n}-agree"), max_tokens) for n in names]
    pairs = []
    for n, b, a in zip(names, batched, alone):
        same = b["text"] == a["text"]
        part = next((i for i, (x, y) in enumerate(zip(b["text"], a["text"])) if x != y), min(len(b["text"]), len(a["text"])))
        pairs.append({"agent": n, "same": same, "first_difference_char": None if same else part,
                      "chars": len(a["text"])})
    return {"agents": k, "max_tokens": max_tokens, "same": sum(p["same"] for p in pairs), "pairs": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 1, 2; short replies; one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--agents", default="1,2,3,4,8")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--long-tokens", type=int, default=3000)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--agree-agents", type=int, default=4)
    ap.add_argument("--parts", default="decode,prefill,agreement", help="which parts to run (comma-separated)")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.agents, args.max_tokens, args.long_tokens, args.short_tokens = 1, "1,2", 8, 200, 4
        args.agree_agents = 2
    ns = [int(x) for x in args.agents.split(",")]
    model = c.resolve_model(args.model)
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    home = c.short_tmp("adcc-")
    with c.Daemon(home, model, "--flush-interval", "3600", "--max-hot", "16") as d:
        parts = set(args.parts.split(","))
        rows, scheduler = batched_decode(d, ns, args.runs, args.max_tokens) if "decode" in parts else ([], None)
        prefill = (short_beside_long(d, c.Tok(model), args.runs, args.long_tokens, args.short_tokens)
                   if "prefill" in parts else None)
        agree = agreement(d, args.agree_agents, args.max_tokens) if "agreement" in parts else None
        with d.client() as cl:
            scheduler_after = cl.status()["scheduler"]
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    if rows:
        print(c.table([(r["agents"], c.fmt(r["serial_wall_s"], 2), c.fmt(r["at_once_wall_s"], 2),
                    c.fmt(r["serial_tok_s"]), c.fmt(r["at_once_tok_s"]), c.fmt(r["speedup"], 2),
                    c.fmt(r["speedup_paired"], 2)) for r in rows],
                  ("agents", "one after another s", "at once s", "tok/s serial", "tok/s at once", "speed-up",
                   "median of each run's")))
    if prefill:
        print(f"short turn beside a {prefill['prompt_tokens']}-token prefill: {prefill['short_beside_long_s_median']:.2f} s "
          f"(alone {prefill['short_alone_s_median']:.2f} s); the prefill took {prefill['long_with_short_s_median']:.1f} s "
          f"(alone {prefill['long_alone_s_median']:.1f} s): {prefill['short_over_long']:.1%}")
    if agree:
        print(f"greedy agreement, batched vs alone: {agree['same']} of {agree['agents']} replies token-exact")
    c.write_json(args.out, {"model": {"id": model.name}, "machine": c.machine_info(), "load_before": load_before,
                            "load_after": load_after, "runs": args.runs, "max_tokens": args.max_tokens,
                            "batched": rows, "scheduler": scheduler, "scheduler_after": scheduler_after,
                            "prefill": prefill, "agreement": agree})


if __name__ == "__main__":
    main()
