"""`agentctl`: the command line of agentd, a thin shell over `agentctl.client.Client`.

Data goes to stdout, diagnostics to stderr. `--json` prints exactly one JSON object on
stdout per command (on failure: {"error": {"code", "message"}}). Exit codes: 0 success,
1 error, 2 usage, 3 daemon not running, 130 interrupted.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from typing import Any, TextIO

import click

from agentd import __version__
from agentctl import render
from agentctl.chat_cli import chat
from agentctl.cli_common import CliError, Options, connected, dumps, emit, pass_opts
from agentctl.client import DEFAULT_TIMEOUT
from agentctl.portable_cli import export, import_

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


# --- daemon ----------------------------------------------------------------------------


@cli.command()
@pass_opts
def status(opts: Options) -> None:
    """Show the daemon, its model, memory, flushing and every agent."""
    with connected(opts) as client:
        emit(opts, client.status(), render.render_status)


@cli.command()
@pass_opts
def ping(opts: Options) -> None:
    """Check that the daemon answers."""
    with connected(opts) as client:
        client.connect()
        start = time.perf_counter()
        result = client.ping()
        rtt = time.perf_counter() - start
    if opts.as_json:
        click.echo(dumps({**result, "rtt_ms": round(rtt * 1000, 3)}))
    else:
        click.echo(render.render_ping(result, rtt))


@cli.command()
@pass_opts
def stop(opts: Options) -> None:
    """Stop the daemon (it saves dirty agents first)."""
    with connected(opts) as client:
        result = client.shutdown()
    emit(opts, result, lambda r: "agentd is stopping; dirty agents are saved before it exits.")


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
    with connected(opts) as client:
        result = client.create(name, role=role, system=system)
    emit(opts, result, lambda r: f"Created agent {r.get('agent', {}).get('name', name)}.")


@cli.command()
@click.argument("source")
@click.argument("name")
@pass_opts
def fork(opts: Options, source: str, name: str) -> None:
    """Create NAME with SOURCE's role, system prompt and conversation.

    The fork's KV cache is rebuilt from the transcript on its first turn.
    """
    with connected(opts) as client:
        result = client.fork(source, name)
    emit(opts, result, lambda r: f"Forked {source} into {name}.")


@cli.command(name="list")
@pass_opts
def list_(opts: Options) -> None:
    """List agents."""
    with connected(opts) as client:
        emit(opts, client.list(), render.render_list)


@cli.command()
@click.argument("name")
@pass_opts
def show(opts: Options, name: str) -> None:
    """Show one agent and its system prompt."""
    with connected(opts) as client:
        emit(opts, client.show(name), render.render_show)


@cli.command()
@click.argument("name")
@pass_opts
def history(opts: Options, name: str) -> None:
    """Print an agent's conversation."""
    with connected(opts) as client:
        emit(opts, client.history(name), render.render_history)


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
    with connected(opts) as client:
        result = client.delete(name)
    emit(opts, result, lambda r: f"Deleted agent {r.get('deleted', name)}.")


@cli.command()
@click.argument("name")
@pass_opts
def reset(opts: Options, name: str) -> None:
    """Forget an agent's conversation, keeping its role and system prompt."""
    with connected(opts) as client:
        result = client.reset(name)
    emit(opts, result, lambda r: f"Reset agent {name}.")


@cli.command()
@click.argument("name", required=False)
@pass_opts
def save(opts: Options, name: str | None) -> None:
    """Save NAME's cache to disk now, or every dirty agent's."""
    with connected(opts) as client:
        result = client.save(name)

    def human(r: dict[str, Any]) -> str:
        saved = r.get("saved") or []
        return f"Saved {', '.join(saved)}." if saved else "Nothing to save: no unsaved changes."

    emit(opts, result, human)


@cli.command()
@click.argument("name")
@pass_opts
def evict(opts: Options, name: str) -> None:
    """Drop an agent's cache from memory (saving it first if needed)."""
    with connected(opts) as client:
        result = client.evict(name)

    def human(r: dict[str, Any]) -> str:
        return f"Evicted {r.get('evicted', name)}" + (" (saved first)." if r.get("was_dirty") else ".")

    emit(opts, result, human)


@cli.command()
@pass_opts
def gc(opts: Options) -> None:
    """Delete stored KV blocks that no agent's saved cache names (also done at start and after deletes)."""
    with connected(opts) as client:
        result = client.gc()
    emit(opts, result, render.render_gc)


# Commands of their own modules (imported here: they are part of every agentctl).
cli.add_command(export)
cli.add_command(import_)
cli.add_command(chat)


def main() -> None:
    """Console entry point."""
    cli(prog_name="agentctl")


if __name__ == "__main__":
    main()
