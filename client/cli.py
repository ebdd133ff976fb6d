"""`agentctl`: the command line of agentd, a thin shell over `agentctl.client.Client`.

Data goes to stdout, diagnostics to stderr. `--json` prints exactly one JSON object on
stdout per command (on failure: {"error": {"code", "message"}}). Exit codes: 0 success,
1 error, 2 usage, 3 daemon not running, 130 interrupted.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import click

from agentd import __version__
from agentd.protocol import ProtocolError, validate_agent_name
from agentctl import render
from agentctl.client import (
    DEFAULT_TIMEOUT,
    AgentdError,
    ChatStream,
    Client,
    ClientError,
    DaemonNotRunning,
)

EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130


@dataclass
class Options:
    socket_path: str | None
    as_json: bool
    timeout: float


class CliError(click.ClickException):
    """One `Error: ...` line on stderr; with --json also the error object on stdout."""

    def __init__(self, message: str, code: str = "ERROR", exit_code: int = 1, as_json: bool = False):
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code
        self.as_json = as_json

    def show(self, file: TextIO | None = None) -> None:
        if self.as_json:
            click.echo(_dumps({"error": {"code": self.code, "message": self.message}}))
        click.echo(f"Error: {self.message}", err=True)


def _error_from(exc: ClientError, as_json: bool) -> CliError:
    if isinstance(exc, DaemonNotRunning):
        return CliError(exc.message, "DAEMON_NOT_RUNNING", EXIT_NOT_RUNNING, as_json)
    if isinstance(exc, AgentdError):
        code = getattr(exc.code, "value", exc.code)
        return CliError(exc.message, str(code), 1, as_json)
    return CliError(exc.message, type(exc).__name__.upper(), 1, as_json)


def _dumps(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray)):
            return o.hex()
        return str(o)

    return json.dumps(obj, ensure_ascii=False, default=default)


@contextmanager
def _connected(opts: Options) -> Iterator[Client]:
    """A client whose errors become one-line CLI errors."""
    client = Client(opts.socket_path, timeout=opts.timeout)
    try:
        yield client
    except ClientError as exc:
        raise _error_from(exc, opts.as_json) from None
    finally:
        client.close()


def _emit(opts: Options, result: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    click.echo(_dumps(result) if opts.as_json else human(result))


# --- the group: built-in commands plus optional ones from other modules ----------------

# Commands living in modules that may be absent (or broken) must never break the CLI.
# `agentctl/demo.py` must define a click command named `demo`.
_OPTIONAL_COMMANDS = {
    "service": ("agentctl.service.cli", "service"),
    "demo": ("agentctl.demo", "demo"),
    "http-env": ("agentctl.http_cli", "http_env"),
    "open": ("agentctl.http_cli", "open_"),
}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # the parent package failed to import
        return False


def _unavailable(name: str, reason: str) -> click.Command:
    def run() -> None:
        raise CliError(f"`agentctl {name}` is unavailable: {reason}")

    return click.Command(name, callback=run, help=f"(unavailable: {reason})")


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(n for n, (module, _) in _OPTIONAL_COMMANDS.items() if _module_exists(module))
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in _OPTIONAL_COMMANDS:
            return command
        module_name, attr = _OPTIONAL_COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                return None  # not written/installed: simply not a command
            return _unavailable(name, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            return _unavailable(name, f"{type(exc).__name__}: {exc}")
        command = getattr(module, attr, None)
        if not isinstance(command, click.Command):
            return _unavailable(name, f"{module_name}.{attr} is not a click command")
        return command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="The daemon's socket (default: $AGENTD_SOCKET, else the per-user runtime dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per command on stdout.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each reply from the daemon.",
)
@click.version_option(__version__, prog_name="agentctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, as_json: bool, timeout: float) -> None:
    """Talk to agentd, the daemon that keeps LLM agents' KV caches warm."""
    ctx.obj = Options(socket_path, as_json, timeout)


pass_opts = click.make_pass_decorator(Options)


# --- daemon ----------------------------------------------------------------------------


@cli.command()
@pass_opts
def status(opts: Options) -> None:
    """Show the daemon, its model, memory, flushing and every agent."""
    with _connected(opts) as client:
        _emit(opts, client.status(), render.render_status)


@cli.command()
@pass_opts
def ping(opts: Options) -> None:
    """Check that the daemon answers."""
    with _connected(opts) as client:
        client.connect()
        start = time.perf_counter()
        result = client.ping()
        rtt = time.perf_counter() - start
    if opts.as_json:
        click.echo(_dumps({**result, "rtt_ms": round(rtt * 1000, 3)}))
    else:
        click.echo(render.render_ping(result, rtt))


@cli.command()
@pass_opts
def stop(opts: Options) -> None:
    """Stop the daemon (it saves dirty agents first)."""
    with _connected(opts) as client:
        result = client.shutdown()
    _emit(opts, result, lambda r: "agentd is stopping; dirty agents are saved before it exits.")


# --- agents ----------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.option("--role", default="", help="A short label for the agent.")
@click.option("--system", "system_text", help="The system prompt.")
@click.option(
    "--system-file", type=click.File("r", encoding="utf-8"), help="Read the system prompt from FILE ('-': stdin)."
)
@pass_opts
def create(opts: Options, name: str, role: str, system_text: str | None, system_file: TextIO | None) -> None:
    """Create an agent NAME."""
    if system_text is not None and system_file is not None:
        raise click.UsageError("give --system or --system-file, not both")
    system = system_file.read() if system_file is not None else (system_text or "")
    with _connected(opts) as client:
        result = client.create(name, role=role, system=system)
    _emit(opts, result, lambda r: f"Created agent {r.get('agent', {}).get('name', name)}.")


@cli.command()
@click.argument("source")
@click.argument("name")
@pass_opts
def fork(opts: Options, source: str, name: str) -> None:
    """Create NAME with SOURCE's role, system prompt and conversation.

    The fork's KV cache is rebuilt from the transcript on its first turn.
    """
    with _connected(opts) as client:
        result = client.fork(source, name)
    _emit(opts, result, lambda r: f"Forked {source} into {name}.")


@cli.command(name="list")
@pass_opts
def list_(opts: Options) -> None:
    """List agents."""
    with _connected(opts) as client:
        _emit(opts, client.list(), render.render_list)


@cli.command()
@click.argument("name")
@pass_opts
def show(opts: Options, name: str) -> None:
    """Show one agent and its system prompt."""
    with _connected(opts) as client:
        _emit(opts, client.show(name), render.render_show)


@cli.command()
@click.argument("name")
@pass_opts
def history(opts: Options, name: str) -> None:
    """Print an agent's conversation."""
    with _connected(opts) as client:
        _emit(opts, client.history(name), render.render_history)


@cli.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_opts
def delete(opts: Options, name: str, yes: bool) -> None:
    """Delete an agent, its conversation and its saved cache."""
    if not yes:
        if opts.as_json:
            raise click.UsageError("--json cannot ask for confirmation: add --yes")
        click.confirm(f"Delete agent {name!r}, its conversation and its saved cache?", abort=True, err=True)
    with _connected(opts) as client:
        result = client.delete(name)
    _emit(opts, result, lambda r: f"Deleted agent {r.get('deleted', name)}.")


@cli.command()
@click.argument("name")
@pass_opts
def reset(opts: Options, name: str) -> None:
    """Forget an agent's conversation, keeping its role and system prompt."""
    with _connected(opts) as client:
        result = client.reset(name)
    _emit(opts, result, lambda r: f"Reset agent {name}.")


@cli.command()
@click.argument("name", required=False)
@pass_opts
def save(opts: Options, name: str | None) -> None:
    """Save NAME's cache to disk now, or every dirty agent's."""
    with _connected(opts) as client:
        result = client.save(name)

    def human(r: dict[str, Any]) -> str:
        saved = r.get("saved") or []
        return f"Saved {', '.join(saved)}." if saved else "Nothing to save: no unsaved changes."

    _emit(opts, result, human)


@cli.command()
@click.argument("name")
@pass_opts
def evict(opts: Options, name: str) -> None:
    """Drop an agent's cache from memory (saving it first if needed)."""
    with _connected(opts) as client:
        result = client.evict(name)

    def human(r: dict[str, Any]) -> str:
        return f"Evicted {r.get('evicted', name)}" + (" (saved first)." if r.get("was_dirty") else ".")

    _emit(opts, result, human)


@cli.command()
@pass_opts
def gc(opts: Options) -> None:
    """Delete stored KV blocks that no agent's saved cache names (also done at start and after deletes)."""
    with _connected(opts) as client:
        result = client.gc()
    _emit(opts, result, render.render_gc)


# --- portable agents -------------------------------------------------------------------

BUNDLE_SUFFIX = ".agent"
READ_CHUNK = 4 * 1024 * 1024


@cli.command()
@click.argument("name")
@click.option("-o", "--output", metavar="FILE", help="Where to write the bundle ('-': stdout).  [default: NAME.agent]")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@pass_opts
def export(opts: Options, name: str, output: str | None, force: bool) -> None:
    """Write agent NAME to one file: its record, transcript and KV cache.

    The cache is first brought up to date with every turn, saved or not. `agentctl import`
    recreates the agent from the file, on this machine or another.
    """
    if output == "-":
        if opts.as_json:
            raise click.UsageError("--json and '-o -' would both write to stdout: give -o FILE")
        if sys.stdout.isatty():
            raise CliError("refusing to write a binary bundle to a terminal: redirect stdout or give -o FILE")
        with _connected(opts) as client:
            result = client.export(name, sys.stdout.buffer.write)
            sys.stdout.buffer.flush()
        click.echo(render.render_export(result, "stdout"), err=True)
        return
    try:
        validate_agent_name(name)  # before NAME becomes part of a file name
    except ProtocolError as exc:
        raise CliError(exc.message, exc.code.value, as_json=opts.as_json) from None
    path = Path(output or name + BUNDLE_SUFFIX)
    if path.exists() and not force:
        raise CliError(f"{path} exists; give --force to replace it", as_json=opts.as_json)
    from agentd.atomic import atomic_replace

    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            result.update(client.export(name, f.write))

    with _connected(opts) as client:
        try:
            # A temp name renamed into place: a failed export leaves no half-written file.
            atomic_replace(path, write)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}", as_json=opts.as_json) from None
    _emit(opts, {**result, "path": str(path)}, lambda r: render.render_export(r, str(path)))


def _read_pieces(f: BinaryIO) -> Iterator[bytes]:
    while data := f.read(READ_CHUNK):
        yield data


@cli.command(name="import")
@click.argument("file")
@click.option("--name", "new_name", help="Import the agent under this name instead of its own.")
@pass_opts
def import_(opts: Options, file: str, new_name: str | None) -> None:
    """Recreate an agent from a bundle FILE made by `agentctl export` ('-': stdin).

    Same model and tokenizer: the KV cache is used as is and the next turn continues from
    it. Another model: only the transcript is imported, and the cache is rebuilt from it on
    first use. A bundle that is damaged, truncated or not a bundle is refused, changing nothing.
    """
    try:
        f = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror or exc}", as_json=opts.as_json) from None
    try:
        with _connected(opts) as client:
            try:
                result = client.import_(_read_pieces(f), name=new_name)
            except OSError as exc:
                raise CliError(f"cannot read {file}: {exc.strerror or exc}", as_json=opts.as_json) from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    _emit(opts, result, render.render_import)


# --- chat ------------------------------------------------------------------------------


def _stream_to_stdout(stream: ChatStream) -> dict[str, Any]:
    """Echo pieces as they arrive; returns the final result."""
    ended_with_newline = True
    try:
        for piece in stream:
            click.echo(piece, nl=False)  # echo flushes: tokens appear as they come
            if piece:
                ended_with_newline = piece.endswith("\n")
    finally:
        # Also on error or Ctrl-C, so a diagnostic on stderr starts on its own line.
        if not ended_with_newline:
            click.echo()
    return stream.wait()


def _one_turn(client: Client, name: str, message: str, gen: dict[str, Any], as_json: bool) -> None:
    stream = client.chat(name, message, **gen)
    try:
        if as_json:
            click.echo(_dumps(stream.wait()))
        else:
            result = _stream_to_stdout(stream)
            click.echo(render.render_chat_stats(result), err=True)
    finally:
        stream.close()


def _interactive(client: Client, name: str, gen: dict[str, Any]) -> None:
    agent = client.show(name).get("agent") or {}
    role = f" ({agent['role']})" if agent.get("role") else ""
    click.echo(f"Chatting with {name}{role}. Ctrl-D or /exit to end.", err=True)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        click.echo("you> ", nl=False, err=True)
        try:
            message = input()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the session
            click.echo("", err=True)
            return
        if message.strip() in ("/exit", "/quit"):
            return
        if not message.strip():
            continue
        try:
            _one_turn(client, name, message, gen, as_json=False)
        except KeyboardInterrupt:
            # The stream closed the connection, which cancels generation; next turn reconnects.
            click.echo("(interrupted)", err=True)
        except AgentdError as exc:
            click.echo(f"Error: {exc.message}", err=True)


@cli.command()
@click.argument("name")
@click.argument("message", required=False)
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 5.0), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed (with --temperature > 0).")
@click.option("--rebuild", is_flag=True,
              help="Recompute the cache from the transcript instead of using the one in memory or on disk.")
@pass_opts
def chat(
    opts: Options, name: str, message: str | None, max_tokens: int, temperature: float, seed: int | None,
    rebuild: bool,
) -> None:
    """Send MESSAGE to agent NAME and stream the reply.

    MESSAGE '-' reads it from stdin; without MESSAGE an interactive session starts.
    """
    gen = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "rebuild": rebuild}
    if message == "-":
        message = sys.stdin.read().rstrip("\n")
        if not message.strip():
            raise CliError("no message on stdin", as_json=opts.as_json)
    if message is None and opts.as_json:
        raise click.UsageError("--json needs a MESSAGE (or '-' to read it from stdin)")
    with _connected(opts) as client:
        try:
            if message is None:
                _interactive(client, name, gen)
            else:
                _one_turn(client, name, message, gen, opts.as_json)
        except KeyboardInterrupt:
            click.echo("(interrupted)", err=True)
            sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    """Console entry point."""
    cli(prog_name="agentctl")


if __name__ == "__main__":
    main()
