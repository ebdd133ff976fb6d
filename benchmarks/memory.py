"""Issue 5, question 3: how much memory does the daemon need per hot agent?

    .venv/bin/python benchmarks/memory.py [--quick] [--model DIR] [--context 1024] [--runs N]

Through the real daemon: ten agents each get a system prompt of about `--context` tokens,
prefilled and saved before the daemon starts (benchmarks/_build.py, untimed). Each run
(re)starts the daemon and makes the
agents hot one by one with a short follow-up (their caches come from disk), reading after
1, 3 and 10 agents: the daemon's RSS (psutil, the daemon's pid) and, from `status`,
`memory.cache_bytes` (what agentd counts for the hot caches) and `memory.active_bytes`
(MLX's live allocations, weights included). Prints medians over runs and the ratio of RSS
growth per agent to the cache bytes per agent. Writes benchmarks/out/memory.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "memory"
COUNTS = [1, 3, 10]
AGENTS = 10


def sample(daemon, client, n: int = 3) -> dict:
    import psutil

    proc = psutil.Process(daemon.pid)
    rss = []
    for i in range(n):
        if i:
            time.sleep(0.2)
        rss.append(proc.memory_info().rss)
    st = client.status()
    return {"rss": c.med(rss), "cache_bytes": st["memory"]["cache_bytes"],
            "active_bytes": st["memory"]["active_bytes"], "model_bytes": st["memory"]["model_bytes"],
            "hot": sum(a["state"] == "hot" for a in st["agents"]),
            "tokens": sum(a["tokens"] for a in st["agents"] if a["state"] == "hot")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64-token contexts, 1 run: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--context", type=int, default=1024, help="tokens of context per agent")
    ap.add_argument("--runs", type=int, default=3, help="daemon restarts, each making the agents hot again")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    context = 64 if args.quick else args.context
    runs = 1 if args.quick else args.runs

    t_start = time.perf_counter()
    model = c.resolve_model(args.model)
    tok = c.Tok(model)
    home = c.short_tmp("adb-mem-")
    daemon = c.Daemon(home, model, "--max-hot", "64", "--cache-budget", "64GB", "--min-available", "1MB",
                      "--flush-interval", "3600")
    names = [f"a{i}" for i in range(AGENTS)]
    samples: list[dict] = []
    try:
        # Different prompts: no two caches could share anything even if agentd tried.
        built = c.build_agents(home / "data", model, [
            {"name": name, "system": tok.text_of_length(context - c.TEMPLATE_SLACK, seed_sentences=i)}
            for i, name in enumerate(names)])
        info: dict = {"build": built}
        for run in range(runs):
            daemon.restart() if run else daemon.start()
            with daemon.client() as cl:
                if not run:
                    info.update(model=cl.status()["model"], blas=c.process_blas(daemon.pid))
                s = {"run": run, "0": sample(daemon, cl)}
                for i, name in enumerate(names, start=1):
                    r = c.timed_chat(cl, name, "One word: status?", 4)
                    assert r["cache_source"] == "disk", r["cache_source"]
                    if i in COUNTS:
                        s[str(i)] = sample(daemon, cl)
                        c.log(f"run {run + 1}: {i} hot: RSS {s[str(i)]['rss'] / 2**20:.0f} MiB, "
                              f"cache {s[str(i)]['cache_bytes'] / 2**20:.1f} MiB")
                samples.append(s)
    finally:
        daemon.kill()
        c.rmtree(home)

    def m(count: str, key: str) -> float:
        return c.med([s[count][key] for s in samples])

    rows, points = [], []
    for n in [0, *COUNTS]:
        k = str(n)
        p = {"agents": n, "rss": m(k, "rss"), "cache_bytes": m(k, "cache_bytes"), "active_bytes": m(k, "active_bytes"),
             "tokens": m(k, "tokens")}
        points.append(p)
        rows.append((n, f"{p['rss'] / 2**20:.0f}", f"{p['cache_bytes'] / 2**20:.1f}", f"{p['active_bytes'] / 2**20:.0f}",
                     int(p["tokens"])))
    one, ten = points[1], points[-1]
    rss_per_agent = (ten["rss"] - one["rss"]) / (AGENTS - 1)
    cache_per_agent = (ten["cache_bytes"] - one["cache_bytes"]) / (AGENTS - 1)
    tokens_per_agent = (ten["tokens"] - one["tokens"]) / (AGENTS - 1)
    ratio = rss_per_agent / cache_per_agent if cache_per_agent else None
    print()
    print(c.table(rows, ("hot agents", "RSS MiB", "cache MiB", "MLX active MiB", "tokens hot")))
    print(f"\nmedian of {runs} run(s) (each a fresh daemon restoring the agents from disk); "
          f"~{int(tokens_per_agent)} tokens per agent; model {info['model']['id']} ({info['model']['bytes'] / 2**20:.0f} MiB "
          f"of weights), BLAS {info['blas']}")
    print(f"headline: each hot agent adds {rss_per_agent / 2**20:.1f} MiB of RSS for "
          f"{cache_per_agent / 2**20:.1f} MiB of KV cache -> RSS/cache {c.fmt(ratio, 2)}x; "
          f"baseline (no agent hot) {points[0]['rss'] / 2**20:.0f} MiB  ({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        **info, "runs": runs, "context": context, "agents": AGENTS,
        "points": points, "samples": samples,
        "headline": {"rss_per_agent": rss_per_agent, "cache_per_agent": cache_per_agent,
                     "tokens_per_agent": tokens_per_agent, "rss_over_cache": ratio, "baseline_rss": points[0]["rss"]},
        "machine": c.machine_info(),
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
