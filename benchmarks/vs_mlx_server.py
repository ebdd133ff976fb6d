"""Issue 5, question 5: agentd against `mlx_lm.server` on the same model and a ~1k-token
context: time to first token of a follow-up request in the same process, and after each
server is restarted.

    .venv/bin/python benchmarks/vs_mlx_server.py [--quick] [--model DIR] [--context 1024]
                                                 [--runs N] [--restart-runs N] [--no-dequantized]

Both servers run as subprocesses on this machine, talked to only over 127.0.0.1 or a Unix
socket. agentd: `python -m agentd`, one agent whose system prompt is `--context` tokens,
`Client.chat`. mlx_lm.server: `python -m mlx_lm.server --model DIR --host 127.0.0.1 --port
P`, OpenAI-style `/v1/chat/completions` with `stream: true`, the whole conversation sent
each time; its `LRUPromptCache` (in memory only, `--prompt-cache-size` entries, default
10) serves the longest cached prefix, so a follow-up prefills only the new turn -- until
the process restarts and the cache is gone. agentd saves the cache to disk (SIGTERM
flushes) and restores it. Time to first token is measured at the client: request sent ->
first text (a frame for agentd, an SSE chunk with content for mlx_lm.server).

mlx_lm.server gets the same OpenBLAS preload agentd's fast path uses. It runs the weights
as the folder has them; with the default model that is 4-bit, whose CPU kernels are slow,
so unless `--no-dequantized` it is also run on a float32 copy (`mlx_lm convert -d`, in
benchmarks/out/models/) to compare caching with equal compute. Writes
benchmarks/out/vs_mlx_server.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "vs_mlx_server"
QUESTIONS = [
    "Here is the incident log. Acknowledge briefly.",
    "In one sentence: what should we check first?",
    "Which team owns the fix?",
    "What is the single biggest risk now?",
    "Name one metric to watch.",
    "What do we tell customers?",
    "Is a rollback still needed?",
    "Who should be paged next?",
    "What would prevent this next time?",
]


# ---- agentd ---------------------------------------------------------------------------------


def run_agentd(model: Path, system: str, runs: int, restart_runs: int, max_tokens: int) -> dict:
    home = c.short_tmp("adb-vs-")
    daemon = c.Daemon(home, model, "--flush-interval", "3600")
    q = iter(QUESTIONS)
    out: dict = {"first": None, "same_process": [], "after_restart": []}
    try:
        daemon.start()
        with daemon.client() as cl:
            out["blas"] = c.process_blas(daemon.pid)
            cl.create("v", role="incident analyst", system=system)
            out["first"] = c.timed_chat(cl, "v", next(q), max_tokens)
            for _ in range(runs):
                r = c.timed_chat(cl, "v", next(q), max_tokens)
                assert r["cache_source"] == "memory", r["cache_source"]
                out["same_process"].append(r)
        for _ in range(restart_runs):
            daemon.restart()
            with daemon.client() as cl:
                r = c.timed_chat(cl, "v", next(q), max_tokens)
                assert r["cache_source"] == "disk", r["cache_source"]
                r["restart_s"] = daemon.start_s
                out["after_restart"].append(r)
        for k in ("same_process", "after_restart"):
            c.log(f"agentd {k}: " + ", ".join(f"{r['client_ttft_ms']:.0f} ms" for r in out[k]))
    finally:
        daemon.kill()
        c.rmtree(home)
    return out


# ---- mlx_lm.server ---------------------------------------------------------------------------


class MlxServer:
    def __init__(self, model: Path, log: Path, env: dict):
        self.model, self.log, self.env = model, log, env
        self.port = c.free_port()
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def start(self, timeout: float = 180.0) -> "MlxServer":
        err = open(self.log, "ab")
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(self.model), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "WARNING"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=err, stderr=err, env=self.env)
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    self.start_s = time.perf_counter() - t0
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("mlx_lm.server did not answer /health")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def chat(self, messages: list[dict], max_tokens: int) -> dict:
        body = json.dumps({"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"mlx_lm.server answered {resp.status}: {resp.read()[:500]!r}")
        first, text, usage = None, [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
        total = time.perf_counter() - t0
        conn.close()
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        return {"client_ttft_ms": (first if first is not None else total) * 1000, "client_total_ms": total * 1000,
                "text": "".join(text), "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": cached}


def run_mlx_server(model: Path, system: str, runs: int, restart_runs: int, max_tokens: int, env: dict,
                   label: str) -> dict:
    home = c.short_tmp("adb-mlxs-")
    server = MlxServer(model, home / "server.log", env)
    q = iter(QUESTIONS)
    messages = [{"role": "system", "content": system}]
    out: dict = {"label": label, "model_dir": str(model), "first": None, "same_process": [], "after_restart": []}

    def ask() -> dict:
        messages.append({"role": "user", "content": next(q)})
        r = server.chat(messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        return r

    try:
        server.start()
        out["first"] = ask()
        for _ in range(runs):
            out["same_process"].append(ask())
        for _ in range(restart_runs):
            server.stop()
            server.start()
            r = ask()
            r["restart_s"] = server.start_s
            out["after_restart"].append(r)
        for k in ("same_process", "after_restart"):
            c.log(f"mlx_lm.server ({label}) {k}: " + ", ".join(
                f"{r['client_ttft_ms']:.0f} ms (cached {r['cached_tokens']}/{r['prompt_tokens']})" for r in out[k]))
    finally:
        server.stop()
        c.rmtree(home)
    return out


def dequantized_copy(model: Path) -> Path | None:
    """A float32 copy of a quantized model folder (None if it is not quantized)."""
    config = json.loads((model / "config.json").read_text())
    if "quantization" not in config:
        return None
    dest = c.OUT_DIR / "models" / (model.name + "-float32")
    if not (dest / "config.json").exists():
        c.log(f"dequantizing {model} -> {dest}")
        c.rmtree(dest)
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(model), "--mlx-path", str(dest),
                        "-d", "--dtype", "float32"], check=True, stdout=subprocess.DEVNULL)
    return dest


def server_env() -> dict:
    """The environment agentd's fast path gives itself: OpenBLAS preloaded, if there is one."""
    sys.path.insert(0, str(c.ROOT))
    from agentd import blas

    env = c.daemon_env()
    decision = blas.decide(env)
    return decision.exec_env or env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 128-token context, 1 run each: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--context", type=int, default=1024, help="tokens in the agent's context")
    ap.add_argument("--runs", type=int, default=3, help="follow-ups in the same process")
    ap.add_argument("--restart-runs", type=int, default=3, help="restarts, each followed by one follow-up")
    ap.add_argument("--mlx-restart-runs", type=int, default=None,
                    help="restarts for mlx_lm.server on 4-bit weights (each prefills it all) [default: --restart-runs]")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-dequantized", action="store_true", help="skip mlx_lm.server on a float32 copy")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    context = 128 if args.quick else args.context
    runs = 1 if args.quick else args.runs
    restart_runs = 1 if args.quick else args.restart_runs
    mlx_restart_runs = 1 if args.quick else (args.mlx_restart_runs or restart_runs)

    t_start = time.perf_counter()
    model = c.resolve_model(args.model)
    system = c.system_prompt(c.Tok(model), context)
    env = server_env()
    results = {"agentd": run_agentd(model, system, runs, restart_runs, args.max_tokens)}
    quantized = dequantized_copy(model) is not None
    results["mlx_lm.server"] = run_mlx_server(model, system, runs, mlx_restart_runs, args.max_tokens, env,
                                              "4-bit, as the folder has it" if quantized else "as the folder has it")
    if quantized and not args.no_dequantized:
        results["mlx_lm.server float32"] = run_mlx_server(dequantized_copy(model), system, runs, restart_runs,
                                                          args.max_tokens, env, "float32 copy")

    rows, summary = [], {}
    for k, v in results.items():
        s = {"first_ms": v["first"]["client_ttft_ms"],
             "same_process_ms": c.med([r["client_ttft_ms"] for r in v["same_process"]]),
             "after_restart_ms": c.med([r["client_ttft_ms"] for r in v["after_restart"]]),
             "restart_s": c.med([r["restart_s"] for r in v["after_restart"]]),
             "prompt_tokens": c.med([r["prompt_tokens"] for r in v["after_restart"]])}
        summary[k] = s
        rows.append((k, c.fmt(s["first_ms"], 0), c.fmt(s["same_process_ms"], 0), c.fmt(s["after_restart_ms"], 0),
                     c.fmt(s["restart_s"], 1), c.fmt(s["prompt_tokens"], 0)))
    print()
    print(c.table(rows, ("", "first request ms", "follow-up ms", "after restart ms", "restart s", "tokens")))
    a = summary["agentd"]
    ratios = {k: {"same_process": v["same_process_ms"] / a["same_process_ms"],
                  "after_restart": v["after_restart_ms"] / a["after_restart_ms"]}
              for k, v in summary.items() if k != "agentd"}
    print(f"\nclient-side time to first token, median; follow-ups: {runs} in the same process, "
          f"{restart_runs} after restarts of agentd ({mlx_restart_runs} for mlx_lm.server on the folder's weights); "
          f"agentd BLAS {results['agentd']['blas']}, mlx_lm.server env LD_PRELOAD={env.get('LD_PRELOAD', '-')}")
    for k, r in ratios.items():
        print(f"{k}/agentd: same process {r['same_process']:.2f}x, after restart {r['after_restart']:.1f}x")
    best = min((k for k in ratios), key=lambda k: summary[k]["after_restart_ms"])
    print(f"headline: after a restart agentd's first token comes in {a['after_restart_ms']:.0f} ms, "
          f"{ratios[best]['after_restart']:.1f}x sooner than {best} ({summary[best]['after_restart_ms']:.0f} ms); "
          f"in the same process {a['same_process_ms']:.0f} vs {summary[best]['same_process_ms']:.0f} ms  "
          f"({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        "model_dir": str(model), "context": context, "runs": runs, "restart_runs": restart_runs,
        "mlx_restart_runs": mlx_restart_runs, "max_tokens": args.max_tokens,
        "mlx_server_ld_preload": env.get("LD_PRELOAD"),
        "results": results, "summary": summary, "ratios": ratios, "best_mlx": best,
        "machine": c.machine_info(),
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
