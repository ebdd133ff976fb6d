"""`agentctl export` and `agentctl import`: an agent as one bundle file, on this machine or another."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import click

from agentd.protocol import ProtocolError, validate_agent_name
from agentctl import render
from agentctl.cli_common import CliError, Options, connected, emit, pass_opts

BUNDLE_SUFFIX = ".agent"
READ_CHUNK = 4 * 1024 * 1024


@click.command()
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
        with connected(opts) as client:
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

    with connected(opts) as client:
        try:
            # A temp name renamed into place: a failed export leaves no half-written file.
            atomic_replace(path, write)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}", as_json=opts.as_json) from None
    emit(opts, {**result, "path": str(path)}, lambda r: render.render_export(r, str(path)))


def _read_pieces(f: BinaryIO) -> Iterator[bytes]:
    while data := f.read(READ_CHUNK):
        yield data


@click.command(name="import")
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
        with connected(opts) as client:
            try:
                result = client.import_(_read_pieces(f), name=new_name)
            except OSError as exc:
                raise CliError(f"cannot read {file}: {exc.strerror or exc}", as_json=opts.as_json) from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    emit(opts, result, render.render_import)
