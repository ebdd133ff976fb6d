"""Run every issue-5 benchmark, plot the results and write a report (`make bench`).

    .venv/bin/python benchmarks/run_all.py [--quick] [--model DIR] [--only ttft,memory]
                                           [--set 'ttft=--runs 2'] [--report-only]

Each script runs as its own process and writes JSON to --out-dir (benchmarks/out/); then
the PNG plots go to --plots (benchmarks/plots/) and the report to --report
(benchmarks/out/REPORT.md), built from that JSON only, so `--report-only` rewrites them
without measuring again. BENCHMARKS.md is not written: it is the curated record, whose
sittings (the GPU's, the before-and-after runs) no script can regenerate, so numbers from
a new report are merged into it by hand.
`--quick` is a smoke run (tiny sizes, one run each); tests/test_benchmarks.py runs it on a
tiny model so the scripts cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPTS = ["save_load", "ttft", "memory", "socket_overhead", "vs_mlx_server", "concurrency"]
# The full run's settings, sized for the CPU fast path on a 2-core machine shared with others;
# ttft.py skips rebuilds that would take over --max-rebuild-s (10 min) each.
FULL_ARGS = {
    "save_load": ["--runs", "5"],
    "ttft": ["--runs", "3", "--big-from", "4096", "--big-runs", "1"],
    "memory": ["--runs", "3"],
    "socket_overhead": ["--runs", "5", "--max-tokens", "128"],
    "vs_mlx_server": ["--runs", "3", "--restart-runs", "3", "--mlx-restart-runs", "2"],
    "concurrency": ["--runs", "3"],
}


def run_script(name: str, args, extra: list[str]) -> dict:
    out = args.out_dir / f"{name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py")]
    if args.out_dir.resolve() != c.OUT_DIR.resolve():
        cmd += ["--out", str(out)]
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", str(args.model)]
    cmd += extra
    shown = " ".join(shlex.quote(x) for x in [display_python(), f"benchmarks/{name}.py", *cmd[2:]])
    c.log(f"\n=== {name}: {shown}")
    t0 = time.perf_counter()
    log_path = args.out_dir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(c.ROOT))
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            log.write(line)
        rc = proc.wait()
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name} failed with exit code {rc} (log: {log_path})")
    return {"name": name, "command": shown, "elapsed_s": elapsed}


def code_state() -> str:
    """The commit measured, and whether the daemon's sources differed from it (a shared tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(c.ROOT)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon", "client"], capture_output=True,
                               text=True, cwd=str(c.ROOT)).stdout.split()
    except OSError:
        return "unknown"
    changed = [x for x in dirty if x.endswith(".py")]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def changed_between(a: str, b: str) -> str:
    a, b = a.split()[0], b.split()[0]
    try:
        out = subprocess.run(["git", "diff", "--name-only", a, b, "--", "daemon", "client"], capture_output=True,
                             text=True, cwd=str(c.ROOT)).stdout.split()
    except OSError:
        return "unknown"
    return ", ".join(out)


def display_python() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(c.ROOT))
    except ValueError:
        return ".venv/bin/python" if ".venv" in exe.parts else str(exe)


# ---- plots ----------------------------------------------------------------------------------


def make_plots(data: dict, plots: Path) -> dict[str, Path]:
    try:
        import matplotlib
    except ImportError:
        c.log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    made = {}
    if "ttft" in data:
        d = data["ttft"]["sizes"]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = [s["prompt_tokens"] for s in d]
        nan = float("nan")
        ax.plot(x, [s["rebuilt_client_ttft_ms"] or nan for s in d], "o-", label="rebuilt (re-prefill)")
        ax.plot(x, [s["resumed_client_ttft_ms"] for s in d], "s-", label="resumed from disk")
        ax.plot(x, [s["restore_ms"] for s in d], "^:", label="of which: restore (load + verify)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title(f"Time to first token after a restart ({data['ttft'].get('model', {}).get('id', '')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made["ttft"] = plots / "ttft_vs_context.png"
        fig.savefig(made["ttft"], dpi=110)
        plt.close(fig)
    if "save_load" in data:
        d = data["save_load"]["sizes"]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = [s["tokens"] for s in d]
        ax.plot(x, [s["save_ms_median"] for s in d], "o-", label="save (with fsync)")
        ax.plot(x, [s["load_ms_median"] for s in d], "s-", label="load (page cache)")
        if any(s["load_cold_ms_median"] for s in d):
            ax.plot(x, [s["load_cold_ms_median"] for s in d], "^-", label="load (cold: pages dropped)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"KV cache save and load ({data['save_load'].get('model', '')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made["save_load"] = plots / "save_load_vs_context.png"
        fig.savefig(made["save_load"], dpi=110)
        plt.close(fig)
    if "memory" in data:
        d = data["memory"]["points"]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = [p["agents"] for p in d]
        ax.plot(x, [p["rss"] / 2**20 for p in d], "o-", label="daemon RSS")
        ax.plot(x, [p["active_bytes"] / 2**20 for p in d], "s-", label="MLX active memory")
        ax.plot(x, [p["cache_bytes"] / 2**20 for p in d], "^-", label="KV caches (status cache_bytes)")
        ax.set_xlabel(f"hot agents (~{data['memory']['context']} tokens each)")
        ax.set_ylabel("MiB")
        ax.set_title("Daemon memory by hot agents")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made["memory"] = plots / "memory_vs_agents.png"
        fig.savefig(made["memory"], dpi=110)
        plt.close(fig)
    if "concurrency" in data:
        rows = data["concurrency"]["batched"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        x = [r["agents"] for r in rows]
        ax1.plot(x, [r["serial_wall_s"] for r in rows], "o-", label="one after another")
        ax1.plot(x, [r["at_once_wall_s"] for r in rows], "s-", label="at once (batched)")
        ax1.set_xlabel("agents, each asked for a reply")
        ax1.set_ylabel("wall time (s)")
        ax1.grid(True, alpha=0.3)
        ax1.legend()
        ax2.plot(x, [r["serial_tok_s"] for r in rows], "o-", label="one after another")
        ax2.plot(x, [r["at_once_tok_s"] for r in rows], "s-", label="at once (batched)")
        ax2.set_xlabel("agents")
        ax2.set_ylabel("aggregate decode tokens/s")
        ax2.grid(True, alpha=0.3)
        ax2.legend()
        fig.suptitle(f"Many agents at once ({data['concurrency'].get('model', {}).get('id', '')}, "
                     f"{data['concurrency']['max_tokens']}-token replies)")
        fig.tight_layout()
        made["concurrency"] = plots / "concurrency.png"
        fig.savefig(made["concurrency"], dpi=110)
        plt.close(fig)
    return made


# ---- the report -----------------------------------------------------------------------------


def md_table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def command_of(d: dict, runs_meta: dict, name: str) -> str:
    if name in runs_meta:
        return runs_meta[name]["command"]
    argv = d.get("argv") or [f"{name}.py"]
    return " ".join([".venv/bin/python", f"benchmarks/{argv[0]}", *map(shlex.quote, argv[1:])])


def rel(path: Path, report: Path) -> str:
    return os.path.relpath(path, report.parent)


def write_report(data: dict, runs_meta: dict, plots: dict, args, total_s: float | None) -> None:
    report: Path = args.report
    any_d = next(iter(data.values()))
    m = any_d.get("machine", {})
    blas = data.get("ttft", data.get("memory", {})).get("blas") or "-"
    model = data.get("ttft", {}).get("model") or data.get("memory", {}).get("model") or {}
    L = ["# Benchmarks", ""]
    L.append("Generated by `benchmarks/run_all.py` from the JSON the scripts wrote (raw data: "
             "`benchmarks/out/*.json`, not committed). Each script answers one question and prints the ratio it "
             "exists for; every number is a median of the runs stated beside it. Regenerate with `make bench` "
             "(`.venv/bin/python benchmarks/run_all.py`), or re-render from existing JSON with `--report-only`.")
    L.append("")
    shown, skip = [], False
    for a in args.argv:  # the notes are printed below, not in the command
        if skip or a == "--note":
            skip = a == "--note"
            continue
        shown.append(a)
    whole = "`" + " ".join([display_python(), "benchmarks/run_all.py", *map(shlex.quote, shown)]) + "`"
    L.append(f"- Produced by: {whole}")
    L.append(f"- Date: {any_d.get('when', '-')}" + (f"; total runtime {total_s / 60:.1f} min" if total_s else ""))
    if getattr(args, "code", None):
        same = args.code.get("end", args.code["start"]) == args.code["start"]
        L.append(f"- Code measured: {args.code['start']}" + ("" if same else (
            f" (others committed during the run; at the end: {args.code['end']}, daemon/client files changed: "
            f"{changed_between(args.code['start'], args.code['end']) or 'none'})")))
    if args.quick:
        L.append("- **Quick smoke run** (`--quick`): tiny sizes and one run each; not a measurement.")
    L += ["", "## Machine", ""]
    ram = m.get("ram_bytes")
    L.append(md_table(("", ""), [
        ("CPU", m.get("cpu", "-")),
        ("cores", f"{m.get('cpus')} ({m.get('cpus_usable')} usable by this process; shared with other users)"),
        ("RAM", f"{ram / 2**30:.1f} GiB" if ram else "-"),
        ("OS", m.get("os", "-")),
        ("Python", m.get("python", "-")),
        ("mlx / mlx-lm", f"{m.get('mlx')} / {m.get('mlx_lm')}"),
        ("BLAS in the daemon", f"{blas} (read from the daemon's /proc/PID/maps)"),
        ("model", f"{model.get('id', '-')}, {model.get('dtype', '-')} KV cache, "
                  f"{(model.get('bytes') or 0) / 2**20:.0f} MiB of weights in memory" if model else "-"),
        ("load average at the end", ", ".join(f"{x:.2f}" for x in m.get("load_avg") or []) or "-"),
    ]))
    L.append("")

    if "save_load" in data:
        d = data["save_load"]
        L += ["## 1. Saving and loading a cache", ""]
        L.append(f"In-process `AgentStore.save` (encode, SHA-256, write `.partial`, fsync, rename, fsync the directory) "
                 f"and `AgentStore.acquire` of the evicted agent (read, verify the checksum, rebuild the cache), "
                 f"median of {d['runs']} runs per size. \"Cold\" loads first drop the file's pages with "
                 f"`posix_fadvise(DONTNEED)`. One agent's conversation grows through the sizes (`AgentStore.warm` "
                 f"prefills only the new turn); the prefill rate of each step is shown for comparison "
                 f"(model preparation in this process: {d.get('prefill_path', '-')}).")
        L.append("")
        L.append(md_table(("tokens", "save ms", "load ms", "load cold ms", "file MiB", "bytes/token", "prefill tok/s"), [
            (s["tokens"], c.fmt(s["save_ms_median"]), c.fmt(s["load_ms_median"]), c.fmt(s["load_cold_ms_median"]),
             f"{s['file_bytes'] / 2**20:.2f}", f"{s['bytes_per_token']:,.0f}", c.fmt(s["prefill_tok_s"], 0))
            for s in d["sizes"]]))
        L.append("")
        last = d["sizes"][-1]
        prefill_all = sum(s["prefill_s"] for s in d["sizes"])
        L.append(f"**Headline:** at {last['tokens']} tokens loading takes {last['load_ms_median']:.0f} ms "
                 f"({c.fmt(last['load_cold_ms_median'], 0)} ms cold) against {prefill_all:.1f} s to prefill the same "
                 f"tokens in this process (the growth steps' sum): **{prefill_all * 1000 / last['load_ms_median']:,.0f}x**; "
                 f"saving takes {last['save_ms_median']:.0f} ms, and the file holds "
                 f"{last['bytes_per_token']:,.0f} bytes per token ({d['dtype']} keys and values).")
        L.append("")
        L.append(f"Command: `{command_of(d, runs_meta, 'save_load')}`")
        if "save_load" in plots:
            L += ["", f"![save and load time vs context]({rel(plots['save_load'], report)})"]
        L.append("")

    if "ttft" in data:
        d = data["ttft"]
        L += ["## 2. Time to first token after a restart: resumed from disk vs rebuilt", ""]
        L.append(f"The real daemon over its socket; one agent per size, its system prompt and a first turn prefilled and saved "
                 f"before the daemon starts (`benchmarks/_build.py`, untimed). Each resumed run restarts the daemon (SIGTERM flush, new process) "
                 f"and asks each agent a short follow-up: the cache is read from disk. Rebuilt forks the agent "
                 f"(`Client.fork`: same transcript, no cache file) and asks the same follow-up, so the whole "
                 f"transcript is prefilled (the first resumed run's prompt; later runs add a turn each, hence the median "
                 f"prompt shown is a turn longer). Client-side time from sending the request to the first text frame "
                 f"(the detokenizer may hold one token back); `restore` is the daemon's load + verify time. "
                 f"Median of {d['runs']} resumed runs per size; rebuilt runs: {d['runs']} below "
                 f"{d['big_from']} tokens, **{d['big_runs']} at {d['big_from']} and above** (each prefills the whole "
                 f"context, minutes at 8k on this CPU).")
        L.append("")
        L.append(md_table(("prompt tokens", "resumed ms", "of which restore ms", "rebuilt ms", "rebuilt / resumed",
                           "runs (resumed / rebuilt)"), [
            (int(s["prompt_tokens"]), c.fmt(s["resumed_client_ttft_ms"], 0), c.fmt(s["restore_ms"], 0),
             c.fmt(s["rebuilt_client_ttft_ms"], 0), f"**{c.fmt(s['ratio'])}x**" if s["ratio"] else "not run",
             f"{s['resumed_runs']} / {s['rebuilt_runs']}") for s in d["sizes"]]))
        L.append("")
        for n, est in (d.get("rebuilt_skipped_estimated_s") or {}).items():
            est = float(est)
            took = f"{est / 60:.0f} min" if est >= 120 else f"{est:.1f} s"
            L.append(f"Rebuilt runs at {n} tokens were skipped: at the rate of the last rebuild one would take over "
                     f"{took} (`--max-rebuild-s {d['max_rebuild_s']:g}`).")
            L.append("")
        big = max((s for s in d["sizes"] if s["ratio"]), key=lambda s: s["target"])
        L.append(f"**Headline:** at {int(big['prompt_tokens'])} tokens the first token comes **{c.fmt(big['ratio'])}x** "
                 f"sooner resumed ({c.fmt(big['resumed_client_ttft_ms'], 0)} ms) than rebuilt "
                 f"({c.fmt(big['rebuilt_client_ttft_ms'], 0)} ms).")
        L.append("")
        L.append(f"Command: `{command_of(d, runs_meta, 'ttft')}`")
        if "ttft" in plots:
            L += ["", f"![time to first token vs context]({rel(plots['ttft'], report)})"]
        L.append("")

    if "memory" in data:
        d = data["memory"]
        h = d["headline"]
        L += ["## 3. Daemon memory per hot agent", ""]
        L.append(f"The real daemon; {d['agents']} agents with ~{d['context']}-token contexts (prefilled and saved before "
                 f"the daemon starts, `benchmarks/_build.py`). Each of {d['runs']} "
                 f"runs restarts the daemon and makes agents hot one by one (restored from disk); RSS of the daemon's "
                 f"pid (psutil) and `status` `memory.cache_bytes` / `memory.active_bytes`, medians over runs.")
        L.append("")
        L.append(md_table(("hot agents", "RSS MiB", "cache_bytes MiB", "active_bytes MiB", "tokens hot"), [
            (p["agents"], f"{p['rss'] / 2**20:.0f}", f"{p['cache_bytes'] / 2**20:.1f}",
             f"{p['active_bytes'] / 2**20:.0f}", int(p["tokens"])) for p in d["points"]]))
        L.append("")
        L.append(f"**Headline:** each hot agent of ~{int(h['tokens_per_agent'])} tokens adds "
                 f"**{h['rss_per_agent'] / 2**20:.1f} MiB** of RSS for {h['cache_per_agent'] / 2**20:.1f} MiB of KV "
                 f"cache (RSS / cache {c.fmt(h['rss_over_cache'], 2)}x); the daemon with no agent hot: "
                 f"{h['baseline_rss'] / 2**20:.0f} MiB.")
        L.append("")
        L.append(f"Command: `{command_of(d, runs_meta, 'memory')}`")
        if "memory" in plots:
            L += ["", f"![memory vs hot agents]({rel(plots['memory'], report)})"]
        L.append("")

    if "socket_overhead" in data:
        d = data["socket_overhead"]
        h = d["headline"]
        a = d["agentd"]
        L += ["## 4. Decode speed through agentd vs mlx-lm in-process", ""]
        L.append(f"Same model folder, prompt ({d['agentd']['runs'][0]['prompt_tokens']} tokens) and max_tokens "
                 f"({d['max_tokens']}), greedy; median of {d['runs']} runs after a warm-up. agentd: `Client.chat` over "
                 f"the socket, tokens/s from the first text frame to the result (the daemon's own "
                 f"`decode_tokens_per_s` beside it). mlx-lm: `stream_generate` in one process started with the same "
                 f"OpenBLAS preload, once with the weights as loaded and once after "
                 f"`agentd.device.prepare_for_device` (dequantized float32, as agentd's CPU path). The headline "
                 f"compares against the variant whose weights take the same memory as the daemon's "
                 f"(**{d['matching_variant']}**).")
        L.append("")
        rows = [("agentd over the socket", c.fmt(a["decode_tok_s"]), c.fmt(a["daemon_decode_tok_s"]),
                 c.fmt(a["wall_s"], 2), f"{d['model']['bytes'] / 2**20:.0f}", "")]
        for k, v in d["mlx_lm"].items():
            rows.append((f"mlx-lm `stream_generate`, {k}", c.fmt(v["decode_tok_s"]), "", c.fmt(v["wall_s"], 2),
                         f"{v['info']['weights_bytes'] / 2**20:.0f}",
                         f"{a['decode_tok_s'] / v['decode_tok_s']:.2f}x" if v["decode_tok_s"] else "-"))
        L.append(md_table(("", "decode tok/s", "daemon-measured tok/s", "wall s", "weights MiB", "agentd / this"), rows))
        L.append("")
        L.append(f"**Headline:** through the socket agentd decodes at **{c.fmt(h['ratio'], 2)}x** the speed of mlx-lm "
                 f"in-process with the same weights ({c.fmt(h['agentd_tok_s'])} vs {c.fmt(h['mlx_lm_tok_s'])} tok/s).")
        L.append("")
        L.append(f"Command: `{command_of(d, runs_meta, 'socket_overhead')}`")
        L.append("")

    if "vs_mlx_server" in data:
        d = data["vs_mlx_server"]
        L += ["## 5. agentd vs `mlx_lm.server`, before and after a restart", ""]
        L.append(f"Same model and a ~{d['context']}-token system prompt, both servers as subprocesses on 127.0.0.1 "
                 f"(mlx_lm.server: `python -m mlx_lm.server --model DIR --host 127.0.0.1 --port P`, streaming "
                 f"`/v1/chat/completions` with the whole conversation each time; its in-memory `LRUPromptCache` "
                 f"reuses the longest cached prefix). Client-side time to first text. Follow-ups: {d['runs']} in the "
                 f"same process; after a restart: {d['restart_runs']} runs for agentd, {d['mlx_restart_runs']} for "
                 f"mlx_lm.server on the folder's weights. mlx_lm.server ran with LD_PRELOAD="
                 f"`{d.get('mlx_server_ld_preload') or '-'}`. If the folder is quantized, mlx_lm.server also ran on a "
                 f"float32 copy (`mlx_lm convert -d`), so the restart comparison is about caching, not kernels.")
        L.append("")
        rows = []
        for k, s in d["summary"].items():
            r = d["ratios"].get(k)
            label = k if k != "mlx_lm.server" else f"mlx_lm.server ({d['results'][k]['label']})"
            rows.append((label, c.fmt(s["first_ms"], 0), c.fmt(s["same_process_ms"], 0), c.fmt(s["after_restart_ms"], 0),
                         c.fmt(s["restart_s"], 1), f"{r['same_process']:.2f}x / {r['after_restart']:.1f}x" if r else ""))
        L.append(md_table(("", "first request ms", "follow-up, same process ms", "follow-up after restart ms",
                           "restart s", "vs agentd (same / restart)"), rows))
        L.append("")
        a = d["summary"]["agentd"]
        # Which mlx_lm.server ran the weights agentd's engine ran (socket_overhead measured that).
        same = "mlx_lm.server"
        if data.get("socket_overhead", {}).get("matching_variant") == "prepare_for_device" \
                and "mlx_lm.server float32" in d["ratios"]:
            same = "mlx_lm.server float32"
        parts = []
        for k in d["ratios"]:
            r, s_ = d["ratios"][k], d["summary"][k]
            tag = "the same weights as agentd" if k == same else "other weights"
            parts.append(f"against {k} ({tag}): **{r['after_restart']:.1f}x** sooner after a restart "
                         f"({s_['after_restart_ms']:,.0f} ms, a full prefill), {r['same_process']:.2f}x in the same "
                         f"process ({s_['same_process_ms']:,.0f} ms)")
        L.append(f"**Headline:** agentd answers a follow-up after a restart in {a['after_restart_ms']:,.0f} ms "
                 f"(same process: {a['same_process_ms']:,.0f} ms); " + "; ".join(parts) + ". Ratios above 1 favour agentd.")
        L.append("")
        L.append(f"Command: `{command_of(d, runs_meta, 'vs_mlx_server')}`")
        L.append("")

    if "concurrency" in data:
        L += concurrency_section(data["concurrency"], plots.get("concurrency"), args.report)

    cpu = args.out_dir / "cpu_backend.json"
    if cpu.exists():
        L += cpu_backend_section(json.loads(cpu.read_text()))
    few = args.out_dir / "few_rows.json"
    if few.exists():
        L += few_rows_section(json.loads(few.read_text()))

    http = args.out_dir / "http_endpoint.json"
    if http.exists():
        L += http_section(json.loads(http.read_text()))

    blocks = args.out_dir / "blocks.json"
    if blocks.exists():
        L += blocks_section(json.loads(blocks.read_text()), args.plots, report)

    portable = args.out_dir / "portable.json"
    if portable.exists():
        L += portable_section(json.loads(portable.read_text()))

    gpu = args.out_dir / "gpu.json"
    if gpu.exists():
        split = args.out_dir / "gpu_split.json"
        L += gpu_section(json.loads(gpu.read_text()), json.loads(split.read_text()) if split.exists() else None)

    if args.notes:
        L += ["## Notes on this run", ""] + [f"- {n}" for n in args.notes] + [""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(L))
    c.log(f"wrote {report}")


def concurrency_section(d: dict, plot: Path | None = None, report: Path | None = None) -> list[str]:
    """Section 7, from benchmarks/concurrency.py."""
    L = ["## 7. Many agents at once: the scheduler batches their turns", ""]
    L.append(f"Measured {d['when']} on {d['model']['id']}, one daemon over its socket, median of {d['runs']} runs; "
             f"load average {' '.join(d.get('load_before') or ['?'])} before, {' '.join(d.get('load_after') or ['?'])} "
             f"after (a shared machine: ratios within one run are what to read). Each agent is asked for a "
             f"{d['max_tokens']}-token reply; **at once**: N client threads released together (one decode "
             f"forward pass carries every decoding turn); **one after another**: the same agents, the same "
             f"question, in turn; the two alternate order between runs.")
    L.append("")
    L.append("| agents | one after another | at once | aggregate tok/s, one after another | at once | speed-up "
             "(medians) | median of each run's speed-up |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|")
    for r in d["batched"]:
        paired = f"{r['speedup_paired']:.2f}x" if "speedup_paired" in r else "-"  # JSON from before it existed
        L.append(f"| {r['agents']} | {r['serial_wall_s']:.2f} s | {r['at_once_wall_s']:.2f} s | "
                 f"{r['serial_tok_s']:.1f} | {r['at_once_tok_s']:.1f} | **{r['speedup']:.2f}x** | {paired} |")
    L.append("")
    pf = d["prefill"]
    L.append(f"**A short turn beside a long prefill.** While agent `long` prefilled a {pf['prompt_tokens']:,}-token "
             f"message ({pf['long_with_short_s_median']:.1f} s; alone {pf['long_alone_s_median']:.1f} s), agent "
             f"`short` was asked a one-line question: answered in **{pf['short_beside_long_s_median']:.2f} s**, "
             f"{pf['short_over_long']:.1%} of the prefill's time (alone: {pf['short_alone_s_median']:.2f} s).")
    L.append("")
    if "agreement" in d:
        a = d["agreement"]
        L.append(f"**Greedy agreement.** {a['agents']} agents asked at once (batched) vs their twins asked alone, "
                 f"{a['max_tokens']}-token replies: **{a['same']} of {a['agents']}** token-exact"
                 + ("." if a["same"] == a["agents"] else
                    " (the others part at character " + ", ".join(str(p["first_difference_char"]) for p in a["pairs"]
                                                          if not p["same"]) + ")."))
        L.append("")
    if plot is not None:
        rel = os.path.relpath(plot, (report or plot).parent) if report else plot
        L.append(f"![many agents at once]({rel})")
        L.append("")
    L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + d['argv'][0], *map(shlex.quote, d['argv'][1:])])}`")
    L.append("")
    return L


def cpu_backend_section(d: dict) -> list[str]:
    """Section 6, from benchmarks/cpu_backend.py's own JSON (a separate run: see `make bench`)."""
    plain, fast, llama, m = d["plain"], d["fast"], d.get("llama_cpp"), d["machine"]
    L = ["## 6. The CPU fast path vs plain `mlx[cpu]` vs llama.cpp", ""]
    L.append(f"Measured {d['when']}, one run of `benchmarks/cpu_backend.py`, each path in its own process on the "
             f"default model. **plain**: the model as `mlx_lm.load` gives it (quantized), MLX's bundled "
             f"{plain['blas']} BLAS, prefill in one pass. **agentd**: float32 weights, OpenBLAS preloaded with "
             f"agentd's one-row sgemm forwarder in front (plan: `{fast['plan']}`). **llama.cpp**: "
             f"`llama-cpp-python` on the same GGUF file"
             + (f", {llama['n_threads']} threads." if llama else " (not run: no llama-cpp-python).")
             + f" Prefill: random token ids, median of {len(fast.get('prefill_512_runs', []))} runs (plain: "
             f"{len(plain.get('prefill_512_runs', []))} at 512, {len(plain.get('prefill_2048_runs', []))} at 2,048). "
             f"Decode: median step after a {fast['decode_context']}-token context.")
    L.append("")
    names = {"prefill_512_tok_s": "prefill 512 tokens, tok/s", "prefill_2048_tok_s": "prefill 2,048 tokens, tok/s",
             "decode_tok_s": f"decode at {fast['decode_context']} tokens of context, tok/s"}
    rows = []
    for k, label in names.items():
        if k not in fast:
            continue
        lc = llama.get(k) if llama else None
        rows.append((label, c.fmt(plain[k]), c.fmt(fast[k]), f"**{fast[k] / plain[k]:.1f}x**", c.fmt(lc),
                     f"{fast[k] / lc:.2f}" if lc else "-"))
    L.append(md_table(("", "plain mlx[cpu]", "agentd", "agentd / plain", "llama.cpp", "agentd / llama.cpp"), rows))
    L.append("")
    a = d["agreement"]
    L.append(f"Greedy answers, fast path vs plain, on {a['prompts']} fixed prompts: {a['identical_answers']} identical, "
             f"{a['positionwise_token_agreement']:.1%} of tokens agree position-wise."
             + "".join(f" Prompt {p['prompt']} parts at token {p['position']}, where the plain path's top two logits "
                       f"are {p['top2_logit_gap']} apart"
                       + (": a tie within rounding, which float32 and the quantized kernels break differently."
                          if p["top2_logit_gap"] < 0.01 else ": more than rounding explains.")
                       for p in a.get("partings", []) if p.get("top2_logit_gap") is not None))
    L.append("")
    weights_mib = fast.get("weights_mib")
    L.append(f"The machine's own limits, same run: numpy float32 GEMM {m['numpy_sgemm_gflops']:.0f} GFLOP/s; a "
             f"memory copy moves {m['numpy_copy_gb_s_read_plus_write']:.1f} GB/s (read + write); {m['cpus']} CPUs."
             + (f" A decode step reads all {weights_mib:.0f} MiB of float32 weights once, so at "
                f"{fast['decode_tok_s']:.1f} tok/s agentd reads weights at "
                f"{weights_mib * 2**20 * fast['decode_tok_s'] / 1e9:.1f} GB/s; llama.cpp reads the GGUF's quantized "
                f"weights, a fraction of those bytes." if weights_mib else ""))
    L.append("")
    L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + d['argv'][0], *map(shlex.quote, d['argv'][1:])]) if d.get('argv') else '.venv/bin/python benchmarks/cpu_backend.py'}`")
    L.append("")
    return L


def few_rows_section(d: dict) -> list[str]:
    """Section 8, from benchmarks/few_rows.py's own JSON (a separate run: see `make bench`)."""
    pr, fw, rs = d["products"], d["forward"], d["restart"]
    load = d.get("machine", {}).get("load_avg")
    L = ["## 8. Few-row products on the CPU", ""]
    L.append(f"Measured {d['when'][:16].replace('T', ' ')}, one run of `benchmarks/few_rows.py` on the default model"
             + (f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
                f"{d['machine'].get('cpus_usable')} CPUs shared with other work" if load else "")
             + ". A decode step, a batched decode step of N agents and a resumed agent's short prefill are "
             "products of 1 to a few dozen rows by the model's weights; agentd's forwarder "
             f"(`daemon/gemv_forward.c`) runs those of up to {fw['max_rows']} rows in a kernel that reads each "
             "weight once, and sends the rest to OpenBLAS.")
    L.append("")
    L.append(f"**Products** (`x @ W.T`, row-major, W transposed, as MLX issues them; {pr['threads']} threads; weights "
             "cycled through 256 MiB of copies so each call reads them from memory; median of "
             f"interleaved rounds). Memory copy on this machine in the same run: "
             f"{pr['copy_gb_s_read_plus_write']:.1f} GB/s (read + write); numpy's sum reads "
             f"{pr['read_gb_s_numpy_sum']:.1f} GB/s. GB/s below is weight bytes read per second.")
    L.append("")
    names = {"openblas": "OpenBLAS 0.3.21", "numpy_openblas": "numpy's OpenBLAS", "agentd": "agentd"}
    impls = pr["impls"]
    rows = []
    for p in pr["products"]:
        best = min(impls, key=lambda i: p[i]["us"])
        rows.append((p["shape"], p["m"],
                     *((f"**{p[i]['us']:,.0f}**" if i == best else f"{p[i]['us']:,.0f}") for i in impls),
                     *(f"{p[i]['gbs']:.1f}" for i in impls), f"{p['agentd']['gflops']:.1f}"))
    L.append(md_table(("product", "rows", *(f"{names.get(i, i)} µs" for i in impls),
                       *(f"{names.get(i, i)} GB/s" for i in impls), "agentd GFLOP/s"), rows))
    L.append("")
    modes = fw["modes"]
    ms_rows = list(modes["agentd"]["ms"])
    L.append(f"**Forward pass** of the default model in-process (agentd's CPU path) with {fw['context']} tokens "
             f"of context, m new tokens, median of {len(modes['agentd']['runs_ms']['1'])} rounds in one process "
             "that alternates agentd's CPU path as shipped, the same with MLX's attention and SwiGLU in place of "
             "agentd's few-row ones, and the forwarder taking one-row products only (every product of two or more "
             "rows to OpenBLAS, as before).")
    L.append("")
    rows = []
    labels = {"agentd": "agentd", "mlx_attention": "agentd with MLX's attention and SwiGLU",
              "one_row_only": "rows ≥ 2 to OpenBLAS, MLX's attention (before)"}
    for mode, v in modes.items():
        # The median, and the fastest of the rounds: on a shared machine the least disturbed one.
        for how, ms in (("median", v["ms"]), ("fastest", {m: min(ts) for m, ts in v["runs_ms"].items()})):
            rows.append((f"{labels.get(mode, mode)}, {how}", *(f"{ms[m]:.1f}" for m in ms_rows),
                         f"**{ms['4'] / ms['1']:.2f}x**", f"{ms['16'] / ms['1']:.2f}x"))
    L.append(md_table(("ms per forward pass", *(f"{m} tok" for m in ms_rows), "4 / 1", "16 / 1"), rows))
    L.append("")
    L.append(f"**After a restart** (the real daemon over its socket, {len(rs['first_turns'])} agents of "
             f"~{rs['first_turn_prefilled']:.0f} tokens, {rs['blas']} BLAS; each turn the first in a freshly started "
             f"daemon): the first turn (whole prompt prefilled) gets its first token in "
             f"{rs['first_turn_client_ttft_ms']:,.0f} ms; the follow-up after a restart (cache from disk, restore "
             f"{rs['follow_up_restore_ms']:.0f} ms, {rs['follow_up_prefilled']:.0f} new tokens on "
             f"{rs['follow_up_cached']:.0f} cached) in {rs['follow_up_client_ttft_ms']:,.0f} ms: "
             f"**{rs['ratio']:.1f}x sooner** (client-side medians; the daemon's own ttft_ms: "
             f"{rs['first_turn_daemon_ttft_ms']:,.0f} and {rs['follow_up_daemon_ttft_ms']:,.0f} ms).")
    L.append("")
    L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + d['argv'][0], *map(shlex.quote, d['argv'][1:])])}`")
    L.append("")
    return L


def blocks_plots(d: dict, plots: Path) -> dict[str, Path]:
    """Section 10's two plots: flush bytes and time vs context, disk bytes vs sharing agents."""
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    made = {}
    if "flush" in d:
        pts = d["flush"]["points"]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        x = [p["tokens"] for p in pts]
        ax.plot(x, [p["wchar"] / 2**20 for p in pts], "o", markersize=10, markerfacecolor="none", zorder=3,
                label="written by the save (wchar)")
        ax.plot(x, [p["new_kv_bytes"] / 2**20 for p in pts], "s", label="the new tokens' KV")
        ax.plot(x, [p["v1_bytes"] / 2**20 for p in pts], "^:", label="a v1 file (the whole cache)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("MiB per save")
        ax.set_title("Save after a short turn: bytes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax2.plot(x, [p["save_ms"] for p in pts], "o")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("context (tokens)")
        ax2.set_ylabel("save round trip (ms)")
        ax2.set_title("Save after a short turn: time")
        ax2.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        made["flush"] = plots / "blocks_flush_vs_context.png"
        fig.savefig(made["flush"], dpi=110)
        plt.close(fig)
    if "share" in d:
        s = d["share"]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = [p["agent"] for p in s["points"]]
        ax.plot(x, [p["disk_bytes"] / 2**20 for p in s["points"]], "o-", label="block store (measured)")
        ax.plot(x, [n * s["one_agent_kv_bytes"] / 2**20 for n in x], "s:", label="one file per agent (v1)")
        ax.set_xlabel(f"agents sharing a {s['system_tokens']:,}-token system prompt")
        ax.set_ylabel("MiB on disk")
        ax.set_title("Disk bytes vs agents sharing a prefix")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made["share"] = plots / "blocks_disk_vs_agents.png"
        fig.savefig(made["share"], dpi=110)
        plt.close(fig)
    return made


def blocks_section(d: dict, plots: Path, report: Path) -> list[str]:
    """Section 10, from benchmarks/blocks.py's own JSON (a separate run: see `make bench`)."""
    made = blocks_plots(d, plots)
    L = ["## 10. The block store: what a save writes, what agents share", ""]
    L.append(f"Measured {d['when']} on {d['model']}; load average {' '.join(d.get('loadavg_start') or [])} at the "
             f"start, {' '.join(d.get('loadavg_end') or [])} at the end (a shared 2-core machine: times are noisy, "
             "byte counts are not). Real daemons on private homes; the default model keeps float32 KV on the CPU "
             "path.")
    L.append("")
    if "flush" in d:
        f = d["flush"]
        L.append(f"**Flush bytes and time vs context.** At each size one agent (a system prompt of that size) takes a "
                 f"first turn and is saved, then {max(p['turn'] for p in f['points']) + 1} short turns (a one-line "
                 f"message, a 16-token reply), each followed by `agentctl save`; `wchar` is the daemon's `/proc/PID/io` across that save. KV is "
                 f"{f['row_bytes']:,} bytes a token; a v1 file is the whole cache, rewritten.")
        L.append("")
        L.append(md_table(("context", "turn", "new tokens", "new KV", "written", "written / new KV", "v1 file would be",
                           "save ms"), [
            (f"{p['tokens']:,}", p["turn"] + 1, p["new_tokens"], f"{p['new_kv_bytes'] / 1e6:.2f} MB",
             f"{p['wchar'] / 1e6:.2f} MB", f"**{p['ratio']:.2f}x**", f"{p['v1_bytes'] / 1e6:,.0f} MB",
             f"{p['save_ms']:.0f}") for p in f["points"]]))
        L.append("")
        B = d.get("block_tokens", 256)
        crossed = [p for p in f["points"] if p["tokens"] // B != (p["tokens"] - p["new_tokens"]) // B]
        within = [p["ratio"] for p in f["points"] if p not in crossed]
        cross = [p["ratio"] for p in crossed]
        L.append(f"A save within a block writes the new rows, appended to the tail, and a manifest: "
                 f"{min(within, default=0):.2f}-{max(within, default=0):.2f}x the new KV ({len(within)} of "
                 f"{len(f['points'])} saves).")
        if cross:
            L[-1] += (f" A save whose turn crossed a block boundary ({len(cross)} here: the sizes sit just below "
                      f"multiples of {B}) wrote {min(cross):.2f}-{max(cross):.2f}x: "
                      + ("the tail file, which already held the block's first rows, became the block (the rows up "
                         "to the boundary and a trailer appended, then a hard link), so every row is written once."
                         if max(cross) < 1.5 else
                         "it also wrote the finished block from memory, so each row is written twice, once to the "
                         "tail and once in its block."))
        L.append("")
        if "flush" in made:
            L.append(f"![flush bytes and time]({rel(made['flush'], report)})")
            L.append("")
    if "share" in d:
        s = d["share"]
        L.append(f"**Disk bytes vs agents sharing a prefix.** {len(s['points'])} agents created with one {s['system_tokens']:,}-token "
                 "system prompt, each a short turn and a save, one after another.")
        L.append("")
        L.append(md_table(("agent", "prefilled", "from blocks", "disk after its save", "disk / one agent's KV"), [
            (p["agent"], p["prefilled"], p["cached"], f"{p['disk_bytes'] / 1e6:.1f} MB",
             f"{p['disk_bytes'] / s['one_agent_kv_bytes']:.2f}x") for p in s["points"]]))
        L.append("")
        L.append(f"{len(s['points'])} agents take **{s['ratio_all']:.2f}x** one agent's KV bytes on disk (one file "
                 f"each: {len(s['points'])}.0x), and agents 2-{len(s['points'])} prefilled at most {max(p['prefilled'] for p in s['points'][1:])} tokens each (v1: all of them).")
        L.append("")
        if "share" in made:
            L.append(f"![disk bytes vs agents]({rel(made['share'], report)})")
            L.append("")
    if "fork" in d:
        k = d["fork"]
        L.append(f"**TTFT of a fork vs rebuilt** ({k['size']:,}-token agent, {len(k['fork_ttft_ms'])} interleaved "
                 f"runs, client side; the fork's time includes the `fork` op): fork **{k['fork_ms_median']:,.0f} ms** "
                 f"(its blocks and a copy of the tail; it prefills only its new message) vs a fresh agent prefilling "
                 f"the same context **{k['rebuilt_ms_median']:,.0f} ms**: "
                 f"{k['rebuilt_ms_median'] / k['fork_ms_median']:.0f}x.")
        L.append("")
    if "restore" in d:
        r = d["restore"]
        L.append(f"**Restore bandwidth.** `CacheRepository.load` (read + verify + rebuild the cache objects) of a "
                 f"{r['tokens']:,}-token agent ({r['kv_bytes'] / 2**20:,.0f} MiB of KV, files in the page cache), "
                 f"interleaved with a numpy copy of the same bytes, medians of {len(r['load_s'])}: restore "
                 f"**{r['restore_gb_s']:.2f} GB/s**; a memory copy into memory already touched "
                 f"{r['memcpy_gb_s']:.2f} GB/s (**{r['ratio']:.0%}**)"
                 + (f", into newly allocated memory (the page faults a restore also takes) "
                    f"{r['memcpy_fresh_gb_s']:.2f} GB/s (**{r['ratio_fresh']:.0%}**)" if "ratio_fresh" in r else "")
                 + ". The bytes are read once into the cache's own arrays (`preadv`) and hashed once (xxh3-128).")
        if "floor" in r:
            fl = r["floor"]
            L[-1] += (f" Its parts on their own: `preadv` of the agent's {fl['files']} files from the page cache into "
                      f"memory already touched {fl['preadv_gb_s']:.2f} GB/s (two threads {fl['preadv_threads_gb_s']:.2f}), "
                      f"xxh3-128 {fl['xxh3_gb_s']:.1f} GB/s.")
        for label, pts in (r.get("first_restore") or {}).items():
            L[-1] += (f" First restore in a new process ({label}, {len(pts)} processes): "
                      f"{c.med([p['load_s'] for p in pts]) * 1000:.0f} ms, "
                      f"{r['kv_bytes'] / c.med([p['load_s'] for p in pts]) / 1e9:.2f} GB/s.")
        L.append("")
    if "kvbits" in d:
        k = d["kvbits"]
        rows = [r for r in k["rows"] if "error" not in r]
        base = rows[0]
        L.append(f"**KV quantization** (`--kv-bits`, group size {k['group_size']}): bytes per token of stored KV, "
                 f"greedy agreement with unquantized KV on {base['prompts']} fixed prompts ({k['answer_tokens']} "
                 f"tokens each), and perplexity on a fixed text ({base['text_tokens']:,} tokens of README.md at "
                 "757017b, teacher-forced through the quantized cache).")
        L.append("")
        L.append(md_table(("KV", "bytes/token", "vs unquantized", "identical answers", "token agreement",
                           "perplexity", "vs unquantized"), [
            ("unquantized" if r["bits"] is None else f"{r['bits']}-bit", f"{r['bytes_per_token']:,}",
             f"{r['bytes_per_token'] / base['bytes_per_token']:.2f}x", f"{r['identical_answers']}/{r['prompts']}",
             f"{r['positionwise_agreement']:.1%}", f"{r['perplexity']:.3f}",
             f"{r['perplexity'] / base['perplexity'] - 1:+.2%}") for r in rows]))
        L.append("")
    for argv in d.get("commands") or [d["argv"]]:
        L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + argv[0], *map(shlex.quote, argv[1:])])}`")
        L.append("")
    return L


def portable_section(d: dict) -> list[str]:
    """Section 11, from benchmarks/portable.py's own JSON (a separate run: see `make bench`)."""
    L = ["## 11. Portable agents: export and import", ""]
    L.append(f"Measured {d['when']} on {Path(d['model']).name}; load average {' '.join(d.get('loadavg_before') or [])} "
             f"before, {' '.join(d.get('loadavg_after') or [])} after (a shared machine). Two daemons on one model; "
             f"at each size {d['runs']} interleaved pairs: `Client.export` from home A to a file (what `agentctl export "
             "-o FILE` does), then `Client.import_` of that file into home B under a new name (upload, every check, "
             "the cache decoded and saved to B's disk). The first export finds the agent cold (its cache is loaded "
             "from disk first), later ones hot. Times are at the client, medians.")
    L.append("")
    L.append(md_table(("context", "tokens", "bundle", "bytes/token (bundle)", "bytes/token (cache file)",
                       "export, cold", "export, hot", "import", "import MB/s", "next turn after import"), [
        (f"{r['size']:,}", f"{r['tokens']:,}", f"{r['bundle_bytes'] / 1e6:,.1f} MB", f"{r['bundle_bytes_per_token']:,.0f}",
         f"{r['cache_file_bytes_per_token']:,.0f}", f"{r['export_cold_s'] * 1000:,.0f} ms",
         f"{r['export_hot_s'] * 1000:,.0f} ms", f"{r['import_s'] * 1000:,.0f} ms", f"{r['import_mb_per_s']:,.0f}",
         f"{r['first_turn']['cache_source']}, {r['first_turn']['cached_tokens']:,} cached, "
         f"{r['first_turn']['prefilled_tokens']} prefilled")
        for r in d["rows"]]))
    L.append("")
    big = max(d["rows"], key=lambda r: r["tokens"])
    L.append(f"**Headline:** an agent of {big['tokens']:,} tokens travels as a {big['bundle_bytes'] / 1e6:,.0f} MB file "
             f"({big['bundle_bytes_per_token'] / big['cache_file_bytes_per_token']:.3f}x the bytes per token of its "
             f"cache file: the same tensors plus the transcript); exporting it takes "
             f"{big['export_hot_s'] * 1000:,.0f} ms hot, importing {big['import_s'] * 1000:,.0f} ms, and the imported "
             f"agent's next turn reuses all {big['first_turn']['cached_tokens']:,} tokens. Building the same context "
             f"in this run (`_build.py`: model load, prefill, save) took {big['build_s']:,.0f} s, "
             f"**{big['build_s'] / big['import_s']:,.0f}x** the import.")
    L.append("")
    L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + d['argv'][0], *map(shlex.quote, d['argv'][1:])])}`")
    L.append("")
    return L


def gpu_section(d: dict, split: dict | None = None) -> list[str]:
    """Section 12, from benchmarks/gpu.py's JSON (a run on a machine with an NVIDIA GPU)."""
    m = d["machine"]
    L = ["## 12. NVIDIA GPU (MLX's CUDA backend)", ""]
    L.append(f"Measured {d['when']} on {m.get('nvidia_smi') or 'an NVIDIA GPU'}, {m['cpus']} CPUs ({m['cpu']}), "
             f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, Python {m['python']}. Random-weight 4-bit models of real "
             "shapes (benchmarks/gpu_models.py). agentd runs as a user starts it"
             + (", with its kernel cache empty at the first start (a fresh machine)"
                if all(r.get("first_start", {}).get("fresh_caches") for r in d["models"].values())
                else ", its kernel cache filled by an earlier run on the same machine")
             + "; time to first token (TTFT) as the daemon reports it "
             "(restore + prefill + first token). Resumed: the agent's next turn after a restart (SIGTERM, new "
             "process), its cache read from disk; rebuilt: a fork of it made before the restart, whose whole "
             f"transcript is prefilled. Medians of {d['runs']} restarts (the first, with the cache files dropped "
             "from the page cache, is shown apart).")
    L.append("")
    rows, starts = [], []
    for name, r in d["models"].items():
        if "first_start" not in r:
            rows.append((name, "-", f"failed: {r.get('error', 'no result')}", *["-"] * 8))
            continue
        first = r["first_start"]
        warm = first["model"].get("warmup") or {"seconds": 0.0}
        starts.append(f"{name}: first start {first['start_s']:.1f} s (kernel warm-up {warm['seconds']:.1f} s"
                      f" of it; backend {first['model'].get('backend')}, {first['model'].get('quantized_layers')} "
                      "layers kept quantized), later starts "
                      + ", ".join(f"{x:.1f}" for x in r["restart_start_s"]) + " s")
        for n, x in r["contexts"].items():
            ft, ip, s_ = x["first_turn"], x.get("inproc", {}), x.get("summary", {})
            compiled = sum(t.get("kernels_compiled") or 0 for t in [ft, *x["resumed"], *x["rebuilt"]])
            rows.append((name, f"{int(n):,}", c.fmt(ip.get("prefill_tps"), 0),
                         c.fmt(ft["prefilled_tokens"] / ft["ttft_ms"] * 1000, 0), c.fmt(ip.get("decode_tps")),
                         c.fmt(ft["decode_tokens_per_s"]), c.fmt(s_.get("resumed_ttft_ms"), 0),
                         c.fmt(s_.get("resumed_page_cache_dropped_ttft_ms"), 0), c.fmt(s_.get("rebuilt_ttft_ms"), 0),
                         f"**{s_['speedup']:.1f}x**" if s_.get("speedup") else "-", str(compiled)))
    L.append(md_table(("model", "context", "prefill tok/s mlx-lm", "prefill tok/s agentd", "decode tok/s mlx-lm",
                       "decode tok/s agentd", "resumed TTFT ms", "resumed, page cache dropped", "rebuilt TTFT ms",
                       "rebuilt / resumed", "kernels compiled in turns"), rows))
    L.append("")
    L += [f"- {x}" for x in starts]
    L.append("")
    for name, r in d["models"].items():
        if r.get("concurrent"):
            L.append(f"Aggregate decode, {name}, agents answering at once (the scheduler batches them; 512-token "
                     "contexts, 64-token replies, tokens over the span from the first first token to the last end): "
                     + ", ".join(f"{x['agents']}: {x['aggregate_tps']:,.0f} tok/s" for x in r["concurrent"]
                                 if x.get("aggregate_tps")) + ".")
            L.append("")
    if split:
        L.append("Where a restore's time goes, in-process (`gpu.py split`): one KV cache saved by mlx-lm, medians of "
                 f"{len(split['split'][0]['runs']) if split.get('split') else 0}, page cache hot; GB/s over the file's "
                 "bytes; a placement counts allocating, filling from the file and the first GPU pass.")
        L.append("")
        disk = split.get("disk", {})
        for sp in split.get("split", []):
            med, gb = sp["median"], sp["bytes"] / 1e9

            def rate(k):
                return f"{gb / med[k]:.1f}" if med.get(k) else "-"
            L.append(md_table(("context", "bytes", "mlx-lm load_prompt_cache", "parallel read", "sha256", "xxh3-128",
                               "xxh3-128, 8 threads", "fill GPU-allocated + first GPU pass",
                               "fill CPU-allocated + first GPU pass", "numpy, mx.array + first GPU pass"),
                              [(f"{sp['tokens']:,}", f"{gb:.2f} GB", rate("mlxlm_load_prompt_cache_s"),
                                rate("read_threads_s"), rate("sha256_s"), rate("xxh3_128_s"), rate("xxh3_128_8threads_s"),
                                f"{gb / (med['gpu_zeros_alloc_s'] + med['gpu_zeros_fill_s'] + med['gpu_zeros_first_gpu_pass_s']):.1f}"
                                if med.get("gpu_zeros_fill_s") else "-",
                                f"{gb / (med['cpu_zeros_alloc_s'] + med['cpu_zeros_fill_s'] + med['cpu_zeros_first_gpu_pass_s']):.1f}"
                                if med.get("cpu_zeros_fill_s") else "-",
                                f"{gb / (med['from_numpy_s'] + med['from_numpy_first_gpu_pass_s']):.1f}")]))
            L.append("")
        if disk:
            L.append(f"The disk, same machine: write + fsync {disk['write_fsync_gbps']:.1f} GB/s, read with the file "
                     f"dropped from the page cache {disk['read_dropped_gbps']:.1f} GB/s, hot {disk['read_hot_gbps']:.1f} GB/s.")
            L.append("")
    L.append(f"Command: `python3 benchmarks/{' '.join(map(shlex.quote, d.get('argv', ['gpu.py'])))}` (and `gpu.py split`); "
             "how to run it on a GPU machine without a registry is in its docstring.")
    L.append("")
    return L


def http_section(d: dict) -> list[str]:
    """Section 9, from benchmarks/http_endpoint.py's own JSON (a separate run: see `make bench`)."""
    dec, summ, rs = d["decode"], d["summary"], d["restart"]
    L = ["## 9. The OpenAI-compatible HTTP endpoint", ""]
    L.append(f"Measured {d['when']} on {Path(d['model']).name}; load average {' '.join(d.get('loadavg_before') or [])} "
             f"before, {' '.join(d.get('loadavg_after') or [])} after (a shared machine: ratios within the run "
             "are what to read).")
    L.append("")
    L.append(f"**Decode through HTTP vs the socket**, one daemon, {len(dec['http'])} interleaved runs each (order "
             "alternating) of the same "
             f"prompt to a fresh agent, {dec['max_tokens']} tokens at most: `agentctl`'s Client on the Unix socket vs "
             "the official `openai` client streaming `/v1/chat/completions` (`model=\"agent:<name>\"`). Rates are "
             "measured at the client, first piece to last; the daemon's own decode rate of each turn beside them.")
    L.append("")
    L.append(md_table(("", "median tok/s (client)", "runs (tok/s)", "median tok/s (daemon)", "tokens per run"), [
        (k, c.fmt(summ["decode"][f"{key}_tok_s"]),
         ", ".join(c.fmt(r["client_decode_tok_s"]) for r in dec[key]),
         c.fmt(c.med([r.get("daemon_decode_tok_s") for r in dec[key]])),
         ", ".join(str(r["generated_tokens"]) for r in dec[key]))
        for k, key in (("socket (msgpack)", "socket"), ("HTTP (SSE)", "http"))]))
    L.append("")
    ratio = summ["decode"]["http_over_socket"]
    L.append(f"HTTP / socket: **{ratio:.3f}** (the goal: at least 0.95).")
    seen = {key: c.med([r["client_decode_tok_s"] / r["daemon_decode_tok_s"] for r in dec[key]
                        if r.get("daemon_decode_tok_s") and r.get("client_decode_tok_s")]) for key in ("socket", "http")}
    if all(seen.values()):
        # Load moves both rates of a run together; what the transport costs is the gap between them.
        L.append(f"Within each run the client sees {seen['http']:.1%} of the daemon's own decode rate over HTTP and "
                 f"{seen['socket']:.1%} over the socket (medians): what the transport costs is below the "
                 "run-to-run noise of this machine.")
    L.append("")
    a, m = rs["agentd"], rs["mlx_lm.server"]
    L.append(f"**Time to first token of a follow-up after a restart**, same `openai` client (streaming, "
             f"time to the first content chunk), a ~{d['context']}-token system prompt, the whole conversation "
             f"sent each time. mlx_lm.server ran `{Path(m['model_dir']).name}` (the float32 weights agentd's CPU "
             "path runs, when the folder is quantized).")
    L.append("")
    rows = []
    for label, r in (("agentd over HTTP", a), ("mlx_lm.server", m)):
        after = r["after_restart"]
        rows.append((label, c.fmt(r["first"]["client_ttft_ms"], 0),
                     ", ".join(c.fmt(x["client_ttft_ms"], 0) for x in after),
                     ", ".join(f"{x['cached_tokens']}/{x['prompt_tokens']}" for x in after),
                     c.fmt(c.med([x["restart_s"] for x in after]))))
    L.append(md_table(("", "first request ms", "follow-up after restart ms", "cached/prompt tokens", "restart s"),
                      rows))
    L.append("")
    L.append(f"**Headline:** after a restart agentd answers a follow-up over HTTP in "
             f"{summ['agentd_after_restart_ms']:,.0f} ms (median), mlx_lm.server in "
             f"{summ['mlx_server_after_restart_ms']:,.0f} ms: **{summ['mlx_over_agentd']:.1f}x** sooner, from the "
             f"disk cache; decode through HTTP runs at {ratio:.1%} of the socket's"
             + (f" (the client sees {seen['http']:.1%} of the daemon's rate)." if all(seen.values()) else "."))
    L.append("")
    L.append(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/' + d['argv'][0], *map(shlex.quote, d['argv'][1:])])}`")
    L.append("")
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one run each")
    ap.add_argument("--model", type=Path, help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=ARGS",
                    help="replace a script's full-run arguments, e.g. 'ttft=--runs 2'")
    ap.add_argument("--note", dest="notes", action="append", default=[], help="a line for the report's notes")
    ap.add_argument("--report-only", action="store_true", help="plots and report from existing JSON")
    ap.add_argument("--out-dir", type=Path, default=c.OUT_DIR)
    ap.add_argument("--plots", type=Path, default=c.ROOT / "benchmarks" / "plots")
    ap.add_argument("--report", type=Path, default=c.OUT_DIR / "REPORT.md")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    names = args.only.split(",") if args.only else SCRIPTS
    extra = {n: ([] if args.quick else list(FULL_ARGS[n])) for n in SCRIPTS}
    for s in args.set:
        n, _, a = s.partition("=")
        extra[n] = shlex.split(a)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    meta_path = args.out_dir / "run_all.json"
    runs_meta = json.loads(meta_path.read_text()).get("scripts", {}) if meta_path.exists() else {}
    total = json.loads(meta_path.read_text()).get("total_s") if args.report_only and meta_path.exists() else None
    code = {"start": code_state()}
    if not args.report_only:
        for n in names:
            runs_meta[n] = run_script(n, args, extra[n])
        total = time.perf_counter() - t0
        code["end"] = code_state()
        meta_path.write_text(json.dumps({"scripts": runs_meta, "total_s": total, "argv": args.argv, "code": code,
                                         "notes": args.notes}, indent=1))
    elif meta_path.exists():
        # The report describes the run that measured, not this re-rendering.
        meta = json.loads(meta_path.read_text())
        code = meta.get("code", code)
        args.argv = meta.get("argv", args.argv)
        args.notes = args.notes or meta.get("notes", [])
        args.quick = "--quick" in args.argv
    args.code = code
    data = {}
    for n in SCRIPTS:
        p = args.out_dir / f"{n}.json"
        if p.exists():
            data[n] = json.loads(p.read_text())
    if not data:
        raise SystemExit(f"no results in {args.out_dir}")
    plots = make_plots(data, args.plots)
    write_report(data, runs_meta, plots, args, total)
    c.log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
