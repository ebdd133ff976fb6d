"""`agentctl demo`: three agents remember an incident across a real daemon restart.

Session 1: a Technical Specialist and a Business Analyst answer a bug report at the same
time (two connections; the daemon batches their turns), and twins of them answer it one
after another, so the time saved is measured in the same run; a Coordinator turns both
answers into an action plan; everything is saved. Then the daemon
process is stopped and a new one started. Session 2: the specialist answers a follow-up
from its restored cache, and a fork of it with the same transcript, told to ignore every
stored cache (`rebuild`), answers the same question, so restoring and rebuilding are
measured side by side in one run.

The demo is a client like any other: it starts `python -m agentd` and talks to it over
the socket; it never imports mlx.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import click

from agentctl import demo_script as story
from agentctl.client import Client, ClientError

READY_TIMEOUT_S = 900  # the first start converts the default model; a slow CPU loads it slowly


class DemoError(click.ClickException):
    pass


class Narrator:
    """Story to stdout, or to stderr when stdout is reserved for --json."""

    def __init__(self, as_json: bool):
        self.out: TextIO = sys.stderr if as_json else sys.stdout

    def say(self, text: str = "", **style: Any) -> None:
        click.secho(text, file=self.out, **style)

    def progress(self, text: str) -> None:
        """A status line that a terminal overwrites in place; elsewhere, one line each."""
        if self.out.isatty():
            self.out.write("\r\033[K" + text)
            self.out.flush()
        else:
            self.say(text, dim=True)

    def end_progress(self) -> None:
        if self.out.isatty():
            self.out.write("\r\033[K")

    def stream(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()

    def heading(self, text: str) -> None:
        self.say()
        self.say(f"== {text} ==", bold=True)


class DaemonRun:
    """One agentd process: started, waited for, stopped. Its log is echoed while it starts."""

    def __init__(self, home: Path, socket_path: Path, model: str | None, narrator: Narrator):
        self.home, self.socket_path, self.model, self.n = home, socket_path, model, narrator
        self.proc: subprocess.Popen | None = None
        self._echo = True
        self.log_path = home / "demo-daemon.log"

    def start(self) -> dict:
        argv = [sys.executable, "-m", "agentd", "--home", str(self.home / "data"), "--socket", str(self.socket_path),
                "--flush-interval", "3600"]
        if self.model:
            argv += ["--model", self.model]
        t0 = time.perf_counter()
        self._echo = True
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise DemoError(f"agentd exited with status {self.proc.returncode}; see {self.log_path}")
            try:
                with Client(self.socket_path, timeout=10) as c:
                    hello = c.hello()
                self._echo = False
                hello["ready_s"] = time.perf_counter() - t0
                return hello
            except ClientError:
                time.sleep(0.1)
        raise DemoError(f"agentd did not become ready in {READY_TIMEOUT_S}s; see {self.log_path}")

    def _pump(self, stream) -> None:
        with open(self.log_path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if self._echo:
                    # "2026-01-01 10:00:00,000 INFO agentd: message" -> "message"
                    message = line.rstrip().split(": ", 1)[-1]
                    self.n.say(f"   agentd | {message}", dim=True)

    def stop(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        with Client(self.socket_path, timeout=60) as c:
            c.shutdown()
        code = self.proc.wait(timeout=300)
        return code, time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _ask(client: Client, n: Narrator, name: str, message: str, max_tokens: int, rebuild: bool = False) -> dict:
    n.say(f"\nuser -> {name}: ", bold=True, nl=False)
    n.say(message if len(message) < 300 else message[:300] + " [...]")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        n.progress(f"   [{name} is reading {total} new tokens: {done}/{total}, {time.perf_counter() - t0:.0f} s]")

    stream = client.chat(name, message, max_tokens=max_tokens, on_progress=progress, rebuild=rebuild)
    started = False
    for piece in stream:
        if not started:
            n.end_progress()
            n.say(f"{name}: ", bold=True, nl=False)
            started = True
        n.stream(piece)
    result = stream.wait()
    if not started:
        n.end_progress()
        n.say(f"{name}: ", bold=True, nl=False)
    agent = client.show(name)["agent"]
    result["cache_tokens_after"] = agent["tokens"]
    n.say()
    n.say(
        f"   [{name}: cache from {result['cache_source']}, {result['cached_tokens']} tokens reused, "
        f"{result['prefilled_tokens']} prefilled, first token after {result['ttft_ms'] / 1000:.2f} s, "
        f"{result['generated_tokens']} tokens at {result['decode_tokens_per_s']:.1f} tok/s; "
        f"{agent['tokens']} tokens now in its cache]",
        fg="cyan",
    )
    return result


def _ask_at_once(socket_path: Path, n: Narrator, names: list[str], message: str, max_tokens: int) -> dict:
    """Ask several agents the same message at once, one connection each (as a multi-agent
    program's threads would): the daemon batches their turns. Replies are shown as each
    completes, since their tokens arrive interleaved."""
    n.say(f"\nuser -> {' and '.join(names)} (at once, one connection each): ", bold=True, nl=False)
    n.say(message if len(message) < 300 else message[:300] + " [...]")
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(name: str) -> None:
        try:
            with Client(socket_path, timeout=3600) as c:
                result = c.chat(name, message, max_tokens=max_tokens).wait()
                result["cache_tokens_after"] = c.show(name)["agent"]["tokens"]
            with lock:
                results[name] = result
                n.end_progress()
                n.say(f"{name}: ", bold=True, nl=False)
                n.say(result["text"])
                n.say(f"   [{name}: {result['prefilled_tokens']} tokens prefilled, first token after "
                      f"{result['ttft_ms'] / 1000:.2f} s, {result['generated_tokens']} tokens, done after "
                      f"{time.perf_counter() - t0:.2f} s]", fg="cyan")
        except BaseException as e:  # re-raised on the demo's thread below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        n.progress(f"   [{', '.join(names)} answering at once: {time.perf_counter() - t0:.0f} s]")
        for t in threads:
            t.join(timeout=1.0)
    n.end_progress()
    if errors:
        raise errors[0]
    return {"results": results, "wall_s": time.perf_counter() - t0}


def _fmt_s(ms: float) -> str:
    return f"{ms / 1000:.2f} s"


def _tables(n: Narrator, figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s1, s2, rb = figures["session1"]["specialist"], figures["session2"]["specialist"], figures["rebuild"]
    console = Console(file=n.out, highlight=False)
    cc = figures["concurrent"]
    t = Table(title="The specialist and the analyst read the report: at once vs one after another (same run)")
    for col in ("", "at once", "one after another", "saved"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("both answers done after", f"{cc['at_once_s']:.2f} s", f"{cc['one_after_another_s']:.2f} s",
              f"{cc['saved_s']:.2f} s ({cc['speedup']:.2f}x)")
    t.add_row("same answers", "", "", "yes" if cc["same_answers"] else "no (see note)")
    console.print(t)
    if not cc["same_answers"]:
        n.say("Note: turns decoded in one batch run their matrix products on several rows at once; "
              "floating-point sums in another order can tip a greedy choice (ARCHITECTURE.md, Determinism).",
              dim=True)
    t = Table(title="The specialist, session 1 vs session 2 (after a daemon restart)")
    for col in ("", "session 1", "session 2"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("cache came from", s1["cache_source"], s2["cache_source"])
    t.add_row("tokens reused from cache", str(s1["cached_tokens"]), str(s2["cached_tokens"]))
    t.add_row("tokens prefilled", str(s1["prefilled_tokens"]), str(s2["prefilled_tokens"]))
    t.add_row("cache restore", "-", f"{s2['restore_ms']:.1f} ms")
    t.add_row("time to first token", _fmt_s(s1["ttft_ms"]), _fmt_s(s2["ttft_ms"]))
    console.print(t)
    t = Table(title="Same agent, same question, same run: restored from disk vs rebuilt by re-prefill")
    for col in ("", "restored", "rebuilt", "ratio"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("tokens prefilled", str(s2["prefilled_tokens"]), str(rb["prefilled_tokens"]), "")
    t.add_row("time to first token", _fmt_s(s2["ttft_ms"]), _fmt_s(rb["ttft_ms"]),
              f"{figures['ttft_speedup']:.1f}x faster")
    t.add_row("same answer", "", "", "yes" if figures["same_answer"] else "no (see note)")
    console.print(t)
    if not figures["same_answer"]:
        n.say("Note: a rebuilt cache is computed in one batch, the restored one token by token as it was "
              "generated; floating-point sums in a different order can tip a greedy choice.", dim=True)


@click.command()
@click.option("--home", type=click.Path(path_type=Path), help="Keep the demo's agents here. [default: a temp dir]")
@click.option("--model", help="An mlx-lm model folder. [default: the daemon's default model]")
@click.option("--short", is_flag=True, help="A short brief instead of the ~1,500-token incident report.")
@click.option("--max-tokens", type=click.IntRange(1, 2048), default=96, show_default=True,
              help="Longest reply of each agent.")
@click.option("--keep", is_flag=True, help="Do not delete the temp home at the end.")
@click.pass_context
def demo(ctx: click.Context, home: Path | None, model: str | None, short: bool, max_tokens: int, keep: bool) -> None:
    """Three agents remember an incident across a real daemon restart."""
    as_json = bool(getattr(ctx.obj, "as_json", False))
    n = Narrator(as_json)
    temp = home is None
    home = Path(tempfile.mkdtemp(prefix="agentd-demo-")) if temp else home.expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    socket_path = home / "run" / "agentd.sock"
    if len(str(socket_path)) > 100:
        socket_path = Path(tempfile.mkdtemp(prefix="agentd-")) / "agentd.sock"
    daemon = DaemonRun(home, socket_path, model, n)
    try:
        figures = _run(n, daemon, short, max_tokens)
    except ClientError as e:
        raise DemoError(f"{e}; daemon log: {daemon.log_path}") from None
    finally:
        daemon.kill()
        if temp and not keep:
            shutil.rmtree(home, ignore_errors=True)
    figures["home"] = str(home) if (keep or not temp) else None
    if as_json:
        click.echo(json.dumps(figures))


def _run(n: Narrator, daemon: DaemonRun, short: bool, max_tokens: int) -> dict:
    figures: dict[str, Any] = {"brief": "short" if short else "full", "max_tokens": max_tokens}
    n.heading("Session 1")
    n.say("Starting agentd (the model loads once and stays in memory)...")
    hello = daemon.start()
    n.say(f"agentd {hello['daemon_version']} ready: pid {hello['pid']}, model {hello['model_id']}, "
          f"{hello['ready_s']:.1f} s")
    figures["session1_daemon"] = {"pid": hello["pid"], "ready_s": round(hello["ready_s"], 3), "model": hello["model_id"]}
    s1: dict[str, dict] = {}
    with Client(daemon.socket_path, timeout=3600) as c:
        for key, (role, _) in story.ROLES.items():
            c.create(key, role=role, system=story.system_prompt(key, short))
        n.say(f"Created {', '.join(story.ROLES)}: each holds its role and the shared incident brief.")
        # Twins taken before anyone is asked (same role, same brief, no cache yet) answer the
        # same report one after another, so the time saved by answering at once is measured.
        for key in ("specialist", "analyst"):
            c.fork(key, f"{key}-alone")
    both = _ask_at_once(daemon.socket_path, n, ["specialist", "analyst"], story.USER_REPORT, max_tokens)
    s1.update(both["results"])
    n.say("\nFor comparison, their twins (same role and brief, no cache yet) answer the same report one "
          "after another, each re-reading the brief as the first two did:")
    with Client(daemon.socket_path, timeout=3600) as c:
        t0 = time.perf_counter()
        # rebuild: the brief the first two just stored must not spare the twins their prefill.
        alone = {key: _ask(c, n, f"{key}-alone", story.USER_REPORT, max_tokens, rebuild=True)
                 for key in ("specialist", "analyst")}
        serial_s = time.perf_counter() - t0
        for key in alone:
            c.delete(f"{key}-alone")
        figures["concurrent"] = {
            "at_once_s": round(both["wall_s"], 3), "one_after_another_s": round(serial_s, 3),
            "saved_s": round(serial_s - both["wall_s"], 3), "speedup": round(serial_s / both["wall_s"], 2),
            "same_answers": all(alone[k]["text"] == s1[k]["text"] for k in alone),
            "alone_texts": {k: alone[k]["text"] for k in alone},
        }
        ask = story.COORDINATOR_ASK.format(specialist=s1["specialist"]["text"], analyst=s1["analyst"]["text"])
        s1["coordinator"] = _ask(c, n, "coordinator", ask, max_tokens + max_tokens // 2)
        t0 = time.perf_counter()
        saved = c.save()["saved"]
        save_ms = (time.perf_counter() - t0) * 1000
        agents = {a["name"]: a for a in c.list()["agents"]}
    n.say(f"\nSaved {len(saved)} agents in {save_ms:.0f} ms: " + ", ".join(
        f"{a} ({agents[a]['tokens']} tokens, {agents[a]['bytes'] / 2**20:.1f} MiB)" for a in saved))
    figures.update(session1=s1, save_ms=round(save_ms, 1), saved_agents=agents)

    n.heading("Restart")
    code, stop_s = daemon.stop()
    n.say(f"agentd pid {hello['pid']} stopped (exit {code}) in {stop_s:.2f} s. Starting a new process...")
    hello2 = daemon.start()
    n.say(f"agentd ready again: pid {hello2['pid']}, {hello2['ready_s']:.1f} s. No agent is in memory yet.")
    figures["restart"] = {"exit_code": code, "stop_s": round(stop_s, 3), "new_pid": hello2["pid"],
                          "ready_s": round(hello2["ready_s"], 3)}

    n.heading("Session 2")
    with Client(daemon.socket_path, timeout=3600) as c:
        # Forked before the question, so both answer it from the very same transcript.
        c.fork("specialist", "specialist-rebuilt")
        s2 = {"specialist": _ask(c, n, "specialist", story.FOLLOW_UP, max_tokens)}
        n.say("\nFor comparison, a fork of the specialist taken before that question (same transcript) "
              "answers it too, told to ignore every stored cache: it re-reads everything.")
        rebuilt = _ask(c, n, "specialist-rebuilt", story.FOLLOW_UP, max_tokens, rebuild=True)
        c.delete("specialist-rebuilt")
    figures.update(session2=s2, rebuild=rebuilt)
    figures["ttft_speedup"] = round(rebuilt["ttft_ms"] / max(s2["specialist"]["ttft_ms"], 1e-3), 2)
    figures["same_answer"] = rebuilt["text"] == s2["specialist"]["text"]
    code, _ = daemon.stop()
    n.heading("Results")
    _tables(n, figures)
    return figures
