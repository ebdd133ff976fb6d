"""`agentctl http-env` and `agentctl open`: the daemon's OpenAI-compatible HTTP side.

Both ask the daemon (`status`) where it listens and where its key file is, then read the
key from that file (0600, this user's): the key never travels over the socket.
"""

from __future__ import annotations

import shlex
import webbrowser
from pathlib import Path
from typing import Any

import click

from agentctl.cli_common import CliError, Options, connected, dumps, pass_opts


def _http(opts: Options) -> tuple[dict[str, Any], str]:
    """(the status result's `http` entry, the key); a clear error when HTTP is off."""
    with connected(opts) as client:
        http = client.status().get("http")
    if not http:
        raise CliError("agentd is not serving HTTP (started with --http off, or its port was taken: see its log)",
                       "HTTP_OFF", as_json=opts.as_json)
    try:
        key = Path(http["token_file"]).read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the HTTP key from {http['token_file']}: {exc.strerror}", "NO_KEY",
                       as_json=opts.as_json) from None
    return http, key


@click.command(name="http-env")
@pass_opts
def http_env(opts: Options) -> None:
    """Print the OPENAI_BASE_URL and OPENAI_API_KEY exports for OpenAI clients.

    Use as `eval "$(agentctl http-env)"`; then `model="agent:NAME"` talks to agent NAME.
    """
    http, key = _http(opts)
    if opts.as_json:
        click.echo(dumps({"base_url": http["base_url"], "api_key": key}))
        return
    click.echo(f"export OPENAI_BASE_URL={shlex.quote(http['base_url'])}")
    click.echo(f"export OPENAI_API_KEY={shlex.quote(key)}")


@click.command(name="open")
@click.option("--no-browser", is_flag=True, help="Only print the URL.")
@pass_opts
def open_(opts: Options, no_browser: bool) -> None:
    """Open the status page in a browser, signed in with the daemon's key.

    The URL carries the key once: the page sets an HttpOnly cookie and redirects to /.
    Without a browser (or with --no-browser) the URL is printed instead.
    """
    http, key = _http(opts)
    url = f"http://{http['address']}/login?key={key}"
    opened = False if no_browser else webbrowser.open(url)
    if opts.as_json:
        click.echo(dumps({"url": url, "opened": opened}))
    elif opened:
        click.echo(f"Opened the status page of http://{http['address']}/ in your browser.")
    else:
        click.echo(url)
