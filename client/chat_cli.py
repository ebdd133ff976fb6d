"""`agentctl chat`: one turn streamed to stdout, or an interactive session."""

from __future__ import annotations

import sys
from typing import Any

import click

from agentctl import render
from agentctl.cli_common import EXIT_INTERRUPTED, CliError, Options, connected, dumps, pass_opts
from agentctl.client import AgentdError, ChatStream, Client


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
            click.echo(dumps(stream.wait()))
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


@click.command()
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
    with connected(opts) as client:
        try:
            if message is None:
                _interactive(client, name, gen)
            else:
                _one_turn(client, name, message, gen, opts.as_json)
        except KeyboardInterrupt:
            click.echo("(interrupted)", err=True)
            sys.exit(EXIT_INTERRUPTED)
