"""`agentctl service ...`: the click group the main CLI mounts with ``cli.add_command(service)``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from .manager import Manager, ServiceError, manager_for
from .ready import ping, wait_until_ready
from .spec import TARGETS, build_spec, default_target, max_socket_path

target_option = click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=default_target,
    show_default="this platform's",
    help="launchd (macOS) or systemd (Linux).",
)


def _manager(target: str) -> Manager:
    return manager_for(target, Path.home())


def _wait(manager: Manager, timeout: float) -> None:
    sock = manager.installed_socket()
    if sock is None:
        raise ServiceError(f"{manager.path} names no AGENTD_SOCKET; reinstall with `agentctl service install`")
    click.echo(f"waiting up to {timeout:g} s for agentd to answer on {sock} ...", err=True)
    if not wait_until_ready(sock, timeout):
        logs = ", ".join(manager.logs())
        raise ServiceError(f"agentd did not answer on {sock} within {timeout:g} s; see {logs}")
    click.echo(f"agentd is running and answering on {sock}")


@click.group()
def service() -> None:
    """Run agentd as a launchd user agent (macOS) or a systemd user unit (Linux)."""


@service.command()
@click.option("--model", type=click.Path(path_type=Path), help="Model folder (AGENTD_MODEL).")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), help="Data directory (AGENTD_HOME).")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), help="Socket path (AGENTD_SOCKET).")
@click.option("--dry-run", is_flag=True, help="Print the file and the commands instead of running them.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the daemon answers.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for the daemon.")
@target_option
def install(
    model: Path | None,
    home: Path | None,
    socket_path: Path | None,
    dry_run: bool,
    wait: bool,
    timeout: float,
    target: str,
) -> None:
    """Write the service definition, load it, and wait until agentd answers."""
    spec = build_spec(target, home=home, socket=socket_path, model=model)
    limit = max_socket_path(target)
    if len(str(spec.socket).encode()) > limit:
        raise click.ClickException(f"socket path {spec.socket} is longer than {limit} bytes; pass a shorter --socket")
    if spec.model is not None and not spec.model.exists():
        click.echo(f"warning: model {spec.model} does not exist (yet)", err=True)
    manager = _manager(target)
    if dry_run:
        click.echo(f"# would write {manager.path} (mode 0644):")
        click.echo(manager.render(spec).decode(), nl=False)
        click.echo("# would run:")
        for argv, when in manager.install_commands():
            click.echo(shlex.join(argv) + (f"  # {when}" if when else ""))
        return
    manager.install(spec)
    click.echo(f"installed {manager.path} and loaded {manager.name}", err=True)
    if wait:
        _wait(manager, timeout)


@service.command()
@target_option
def uninstall(target: str) -> None:
    """Stop and unload the service and remove its file; agentd's data stays."""
    manager = _manager(target)
    if manager.uninstall():
        click.echo(f"removed {manager.name} ({manager.path}); the data in the agentd home is kept")
    else:
        click.echo(f"{manager.name} was not installed")


@service.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@target_option
@click.pass_context
def status(ctx: click.Context, as_json: bool, target: str) -> None:
    """Installed? loaded? running? pid, logs, last exit status, and whether it answers."""
    # `agentctl --json service status` asks for JSON as much as `service status --json`.
    as_json = as_json or bool(getattr(ctx.find_root().obj, "as_json", False))
    manager = _manager(target)
    installed = manager.path.exists()
    sock = manager.installed_socket() if installed else None
    try:
        state = {**manager.state(), "error": None}
    except ServiceError as exc:
        # Still report what the files say (e.g. no systemd user bus in a container).
        state = {"loaded": None, "running": None, "pid": None, "last_exit": None, "error": exc.message}
    report = {
        "target": manager.target,
        "name": manager.name,
        "file": str(manager.path),
        "installed": installed,
        **state,
        "logs": manager.logs() if installed else [],
        "socket": str(sock) if sock else None,
        "answering": ping(sock) if sock else False,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return

    def yes(flag: bool | None) -> str:
        return "unknown" if flag is None else "yes" if flag else "no"

    running = yes(report["running"]) + (f" (pid {report['pid']})" if report["pid"] else "")
    rows = [
        ("service", f"{report['target']} {report['name']}"),
        ("file", f"{report['file']} ({'installed' if installed else 'not installed'})"),
        ("loaded", yes(report["loaded"])),
        ("running", running),
        ("last exit", report["last_exit"] or "-"),
        ("socket", f"{report['socket'] or '-'} (answering: {yes(report['answering'])})"),
        ("logs", ", ".join(report["logs"]) or "-"),
    ]
    if report["error"]:
        rows.append(("error", report["error"]))
    for key, value in rows:
        click.echo(f"{key:<10} {value}")


@service.command()
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the daemon answers.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for the daemon.")
@target_option
def restart(wait: bool, timeout: float, target: str) -> None:
    """Restart the daemon (launchctl kickstart -k / systemctl --user restart)."""
    manager = _manager(target)
    manager.restart()
    click.echo(f"restarted {manager.name}", err=True)
    if wait:
        _wait(manager, timeout)
