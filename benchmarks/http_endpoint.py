"""Issue 12: what the OpenAI-compatible HTTP front end costs, and what it gives clients.

    .venv/bin/python benchmarks/http_endpoint.py [--quick] [--model DIR] [--runs N]
                                                 [--restart-runs N] [--max-tokens N] [--context N]

(Not `http.py`: a script of that name in benchmarks/ would shadow the standard library's
`http` package for every script run from this folder.)

1. Decode through HTTP vs the socket, one daemon, interleaved runs (the order alternating):
   the same prompt to a fresh agent each run, once through `agentctl`'s Client (Unix socket) and once through the
   official `openai` client (`/v1/chat/completions`, stream=True, model `agent:<name>`).
   Decode rate at the client: (generated tokens - 1) / (last piece - first piece).
2. Time to first token of a follow-up after a restart, same `openai` client, same model
   weights and a `--context`-token system prompt: agentd over HTTP (the agent's cache comes
   back from disk) vs mlx_lm.server (its prompt cache lives in memory, so a restart means a
   full prefill). mlx_lm.server runs a float32 copy of a quantized folder, the weights
   agentd's CPU path runs, so the comparison is about caching, not kernels.

Writes benchmarks/out/http_endpoint.json; run_all.py renders it as BENCHMARKS.md section 9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from vs_mlx_server import QUESTIONS, MlxServer, dequantized_copy, server_env  # noqa: E402

NAME = "http_endpoint"
DECODE_PROMPT = "Count from 1 to 300, separated by commas, and nothing else."


def _openai(base_url: str, key: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=1800)


def _http_of(daemon: c.Daemon) -> tuple[str, str]:
    with daemon.client() as cl:
        http = cl.status()["http"]
    return http["base_url"], Path(http["token_file"]).read_text().strip()


def timed_stream(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: client-side TTFT, decode rate, the text and usage."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    first = last = None
    text, usage, extra = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage, extra = chunk.usage, (chunk.model_extra or {}).get("agentd")
        for choice in chunk.choices:
            if choice.delta.content:
                last = time.perf_counter()
                first = first or last
                text.append(choice.delta.content)
    end = time.perf_counter()
    generated = usage.completion_tokens if usage else len(text)
    return {"client_ttft_ms": ((first or end) - t0) * 1000, "generated_tokens": generated,
            "client_decode_tok_s": (generated - 1) / (last - first) if first and last and last > first else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else None,
            "daemon_decode_tok_s": (extra or {}).get("decode_tokens_per_s"), "text": "".join(text)}


def timed_socket(client, name: str, message: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = client.chat(name, message, max_tokens=max_tokens, temperature=0.0)
    first = last = None
    for piece in stream:
        if piece:
            last = time.perf_counter()
            first = first or last
    result = stream.wait()
    generated = result["generated_tokens"]
    return {"client_ttft_ms": ((first or time.perf_counter()) - t0) * 1000, "generated_tokens": generated,
            "client_decode_tok_s": (generated - 1) / (last - first) if first and last and last > first else None,
            "daemon_decode_tok_s": result["decode_tokens_per_s"]}


def decode_http_vs_socket(model: Path, runs: int, max_tokens: int) -> dict:
    home = c.short_tmp("adb-http-")
    daemon = c.Daemon(home, model, "--http", "127.0.0.1:0", "--flush-interval", "3600")
    out: dict = {"socket": [], "http": [], "max_tokens": max_tokens, "prompt": DECODE_PROMPT}
    try:
        daemon.start()
        base_url, key = _http_of(daemon)
        client = _openai(base_url, key)
        with daemon.client() as cl:
            for i in range(runs):  # interleaved, order alternating, so load on the machine hits both alike
                cl.create(f"s{i}")
                for path in (("socket", "http") if i % 2 == 0 else ("http", "socket")):
                    if path == "socket":
                        out["socket"].append(timed_socket(cl, f"s{i}", DECODE_PROMPT, max_tokens))
                    else:
                        out["http"].append(timed_stream(client, f"agent:h{i}",
                                                        [{"role": "user", "content": DECODE_PROMPT}], max_tokens))
                c.log(f"decode run {i + 1}: socket {c.fmt(out['socket'][-1]['client_decode_tok_s'])} tok/s "
                      f"(daemon {c.fmt(out['socket'][-1]['daemon_decode_tok_s'])}), "
                      f"HTTP {c.fmt(out['http'][-1]['client_decode_tok_s'])} tok/s "
                      f"(daemon {c.fmt(out['http'][-1]['daemon_decode_tok_s'])})")
                cl.evict(f"s{i}")
                cl.evict(f"h{i}")
    finally:
        daemon.kill()
        c.rmtree(home)
    s = c.med([r["client_decode_tok_s"] for r in out["socket"]])
    h = c.med([r["client_decode_tok_s"] for r in out["http"]])
    out["summary"] = {"socket_tok_s": s, "http_tok_s": h, "http_over_socket": h / s if s and h else None}
    return out


def _conversation(system: str):
    messages = [{"role": "system", "content": system}]
    questions = iter(QUESTIONS)

    def ask(client, model: str, max_tokens: int) -> dict:
        messages.append({"role": "user", "content": next(questions)})
        r = timed_stream(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        return r

    return ask


def restart_agentd(model: Path, system: str, restart_runs: int, max_tokens: int) -> dict:
    home = c.short_tmp("adb-httpr-")
    port = c.free_port()  # fixed across restarts, as a client's OPENAI_BASE_URL would be
    daemon = c.Daemon(home, model, "--http", f"127.0.0.1:{port}", "--flush-interval", "3600")
    ask = _conversation(system)
    out: dict = {"first": None, "after_restart": []}
    try:
        daemon.start()
        out["first"] = ask(_openai(*_http_of(daemon)), "agent:v", max_tokens)
        for _ in range(restart_runs):
            daemon.restart()
            r = ask(_openai(*_http_of(daemon)), "agent:v", max_tokens)
            r["restart_s"] = daemon.start_s
            out["after_restart"].append(r)
    finally:
        daemon.kill()
        c.rmtree(home)
    return out


def restart_mlx_server(model: Path, system: str, restart_runs: int, max_tokens: int) -> dict:
    home = c.short_tmp("adb-httpm-")
    server = MlxServer(model, home / "server.log", server_env())
    ask = _conversation(system)
    out: dict = {"model_dir": str(model), "first": None, "after_restart": []}
    try:
        server.start()
        client = _openai(f"http://127.0.0.1:{server.port}/v1", "unused")
        out["first"] = ask(client, "default_model", max_tokens)
        for _ in range(restart_runs):
            server.stop()
            server.start()
            r = ask(client, "default_model", max_tokens)
            r["restart_s"] = server.start_s
            out["after_restart"].append(r)
    finally:
        server.stop()
        c.rmtree(home)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one run of each, short context")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--runs", type=int, default=5, help="decode runs per path")
    ap.add_argument("--restart-runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128, help="decode length per run")
    ap.add_argument("--context", type=int, default=1024, help="system prompt tokens for the restart comparison")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.restart_runs, args.max_tokens, args.context = 1, 1, 16, 128
    model = c.resolve_model(args.model)
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None

    decode = decode_http_vs_socket(model, args.runs, args.max_tokens)
    system = c.system_prompt(c.Tok(model), args.context)
    agentd = restart_agentd(model, system, args.restart_runs, 8)
    mlx_model = dequantized_copy(model) or model
    mlx = restart_mlx_server(mlx_model, system, args.restart_runs, 8)
    a = c.med([r["client_ttft_ms"] for r in agentd["after_restart"]])
    m = c.med([r["client_ttft_ms"] for r in mlx["after_restart"]])
    summary = {"decode": decode["summary"], "agentd_after_restart_ms": a, "mlx_server_after_restart_ms": m,
               "mlx_over_agentd": m / a if a and m else None}
    c.log(f"decode through HTTP / socket: {c.fmt(decode['summary']['http_over_socket'], 3)}; "
          f"TTFT after a restart: agentd {c.fmt(a)} ms, mlx_lm.server {c.fmt(m)} ms")
    c.write_json(args.out, {"machine": c.machine_info(), "model": str(model), "context": args.context,
                            "loadavg_before": load_before,
                            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if load_before else None,
                            "decode": decode, "restart": {"agentd": agentd, "mlx_lm.server": mlx},
                            "summary": summary})


if __name__ == "__main__":
    main()
