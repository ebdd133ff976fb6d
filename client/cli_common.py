"""What every `agentctl` command module shares: the options the group parses, one-line
errors (with --json, also an error object on stdout), a connected client, and output.

Data goes to stdout, diagnostics to stderr. Exit codes: 0 success, 1 error, 2 usage, 3 daemon
not running, 130 interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import click

from agentctl.client import AgentdError, Client, ClientError, DaemonNotRunning

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
            click.echo(dumps({"error": {"code": self.code, "message": self.message}}))
        click.echo(f"Error: {self.message}", err=True)


def _error_from(exc: ClientError, as_json: bool) -> CliError:
    if isinstance(exc, DaemonNotRunning):
        return CliError(exc.message, "DAEMON_NOT_RUNNING", EXIT_NOT_RUNNING, as_json)
    if isinstance(exc, AgentdError):
        code = getattr(exc.code, "value", exc.code)
        return CliError(exc.message, str(code), 1, as_json)
    return CliError(exc.message, type(exc).__name__.upper(), 1, as_json)


def dumps(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray)):
            return o.hex()
        return str(o)

    return json.dumps(obj, ensure_ascii=False, default=default)


@contextmanager
def connected(opts: Options) -> Iterator[Client]:
    """A client whose errors become one-line CLI errors."""
    client = Client(opts.socket_path, timeout=opts.timeout)
    try:
        yield client
    except ClientError as exc:
        raise _error_from(exc, opts.as_json) from None
    finally:
        client.close()


def emit(opts: Options, result: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    click.echo(dumps(result) if opts.as_json else human(result))


pass_opts = click.make_pass_decorator(Options)
