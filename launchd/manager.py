"""Install, remove, inspect and restart the service by running launchctl or systemctl.

Each manager writes its definition file atomically and drives its service manager through
``subprocess``; any refusal becomes a one-line ServiceError (a click.ClickException).
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from .files import write_atomic
from .plist import plist_bytes, plist_path
from .spec import LABEL, STOP_TIMEOUT_SECONDS, UNIT, ServiceSpec
from .systemd import START_TIMEOUT_SECONDS, read_environment, render_unit, unit_path

# A call may legitimately wait for a start (READY=1) or a stop (final flush).
_COMMAND_TIMEOUT = START_TIMEOUT_SECONDS + STOP_TIMEOUT_SECONDS + 30

_HINTS = {
    "launchctl": "launchd services need macOS; on Linux use --target systemd, or --dry-run to only render the file",
    "systemctl": "systemd user services need Linux with systemd; use --dry-run to only render the file",
}


class ServiceError(click.ClickException):
    """launchctl or systemctl is missing or refused; the message is one line."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    except FileNotFoundError:
        hint = _HINTS.get(argv[0], "install it or fix PATH")
        raise ServiceError(f"{argv[0]} not found on PATH: {hint}") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish in {_COMMAND_TIMEOUT} s") from None
    if check and proc.returncode != 0:
        raise ServiceError(refusal(argv, proc))
    return proc


def refusal(argv: list[str], proc: subprocess.CompletedProcess[str]) -> str:
    said = _one_line(proc.stderr or proc.stdout) or "no output"
    return f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {said}"


class Manager:
    """What both service managers offer; ``path`` is the definition file."""

    target: str
    name: str
    path: Path

    def render(self, spec: ServiceSpec) -> bytes:
        raise NotImplementedError

    def install_commands(self) -> list[tuple[list[str], str]]:
        """The commands install runs, each with a note on when ('' for always)."""
        raise NotImplementedError

    def install(self, spec: ServiceSpec) -> None:
        raise NotImplementedError

    def uninstall(self) -> bool:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """loaded, running, pid, last_exit as the service manager reports them."""
        raise NotImplementedError

    def installed_environment(self) -> dict[str, str]:
        raise NotImplementedError

    def logs(self) -> list[str]:
        raise NotImplementedError

    def installed_socket(self) -> Path | None:
        sock = self.installed_environment().get("AGENTD_SOCKET")
        return Path(sock) if sock else None

    def _write(self, spec: ServiceSpec) -> None:
        write_atomic(self.path, self.render(spec), mode=0o644)


class Launchd(Manager):
    target = "launchd"
    # Bootstrap attempts and the first back-off (doubling): 0.5 + 1 + 2 s at most.
    ATTEMPTS = 4
    RETRY_DELAY = 0.5

    def __init__(self, user_home: Path, label: str = LABEL):
        self.name = label
        self.path = plist_path(user_home, label)
        self.domain = f"gui/{os.getuid()}"
        self.service = f"{self.domain}/{label}"

    def render(self, spec: ServiceSpec) -> bytes:
        return plist_bytes(spec, self.name)

    def install_commands(self) -> list[tuple[list[str], str]]:
        return [
            (["launchctl", "bootout", self.service], "only if already loaded"),
            (["launchctl", "enable", self.service], ""),
            (["launchctl", "bootstrap", self.domain, str(self.path)], ""),
        ]

    def _loaded(self) -> bool:
        return run(["launchctl", "print", self.service], check=False).returncode == 0

    def _wait_unloaded(self, timeout: float = STOP_TIMEOUT_SECONDS + 5) -> None:
        # bootout returns before launchd has forgotten the job while the daemon flushes.
        deadline = time.monotonic() + timeout
        while self._loaded() and time.monotonic() < deadline:
            time.sleep(0.25)

    def install(self, spec: ServiceSpec) -> None:
        # Ask launchctl first: if it is missing or refuses, nothing has been written.
        was_loaded = self._loaded()
        # launchd opens StandardOutPath itself but does not create its directory.
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        self._write(spec)
        if was_loaded:
            run(["launchctl", "bootout", self.service])
            self._wait_unloaded()
        # A service disabled earlier (launchctl disable) refuses to bootstrap.
        run(["launchctl", "enable", self.service])
        bootstrap = ["launchctl", "bootstrap", self.domain, str(self.path)]
        for attempt in range(self.ATTEMPTS):
            proc = run(bootstrap, check=False)
            if proc.returncode == 0:
                return
            # "Bootstrap failed: 5: Input/output error" mostly means the old job is still
            # loaded (a bootout in flight): boot it out, wait, try again.
            still_loaded = "Bootstrap failed: 5" in (proc.stderr + proc.stdout)
            if not still_loaded or attempt == self.ATTEMPTS - 1:
                raise ServiceError(refusal(bootstrap, proc))
            run(["launchctl", "bootout", self.service], check=False)
            self._wait_unloaded()
            time.sleep(self.RETRY_DELAY * 2**attempt)

    def uninstall(self) -> bool:
        was_loaded = self._loaded()
        if was_loaded:
            run(["launchctl", "bootout", self.service])
            self._wait_unloaded()
        existed = self.path.exists()
        self.path.unlink(missing_ok=True)
        return was_loaded or existed

    def restart(self) -> None:
        if not self._loaded():
            raise ServiceError(f"{self.name} is not loaded; run `agentctl service install` first")
        run(["launchctl", "kickstart", "-k", self.service])

    def state(self) -> dict[str, Any]:
        proc = run(["launchctl", "print", self.service], check=False)
        if proc.returncode != 0:
            return {"loaded": False, "running": False, "pid": None, "last_exit": None}
        fields: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            match = re.match(r"\s*(state|pid|last exit code) = (.*)$", line)
            if match:
                fields.setdefault(match[1], match[2].strip())  # nested blocks come later
        pid = fields.get("pid")
        return {
            "loaded": True,
            "running": fields.get("state") == "running",
            "pid": int(pid) if pid and pid.isdigit() else None,
            "last_exit": fields.get("last exit code"),
        }

    def _installed(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as f:
                return plistlib.load(f)
        except (OSError, plistlib.InvalidFileException, ValueError):
            return {}

    def installed_environment(self) -> dict[str, str]:
        return dict(self._installed().get("EnvironmentVariables", {}))

    def logs(self) -> list[str]:
        plist = self._installed()
        return [plist[k] for k in ("StandardErrorPath", "StandardOutPath") if k in plist]


class Systemd(Manager):
    target = "systemd"

    def __init__(self, user_home: Path, unit: str = UNIT):
        self.name = unit
        self.path = unit_path(user_home, unit)

    def render(self, spec: ServiceSpec) -> bytes:
        return render_unit(spec).encode()

    @staticmethod
    def _systemctl(*args: str) -> list[str]:
        return ["systemctl", "--user", *args]

    def install_commands(self) -> list[tuple[list[str], str]]:
        return [
            (self._systemctl("daemon-reload"), ""),
            (self._systemctl("enable", "--now", self.name), ""),
            (self._systemctl("restart", self.name), "only if it was already running"),
        ]

    def _active(self) -> bool:
        return run(self._systemctl("is-active", "--quiet", self.name), check=False).returncode == 0

    def install(self, spec: ServiceSpec) -> None:
        was_active = self._active()
        self._write(spec)
        run(self._systemctl("daemon-reload"))
        # With Type=notify this returns once the daemon has sent READY=1.
        run(self._systemctl("enable", "--now", self.name))
        if was_active:
            # enable --now leaves a running daemon on the old definition.
            run(self._systemctl("restart", self.name))

    def uninstall(self) -> bool:
        if not self.path.exists():
            return False
        run(self._systemctl("disable", "--now", self.name))
        self.path.unlink()
        run(self._systemctl("daemon-reload"))
        return True

    def restart(self) -> None:
        if not self.path.exists():
            raise ServiceError(f"{self.name} is not installed; run `agentctl service install` first")
        run(self._systemctl("restart", self.name))

    def state(self) -> dict[str, Any]:
        props = "LoadState,ActiveState,SubState,MainPID,ExecMainCode,ExecMainStatus"
        proc = run(self._systemctl("show", self.name, f"--property={props}"))
        fields = dict(line.partition("=")[::2] for line in proc.stdout.splitlines() if "=" in line)
        pid = fields.get("MainPID", "0")
        # ExecMainCode is 0 until the main process has exited once.
        exited = fields.get("ExecMainCode", "0") not in ("", "0")
        return {
            "loaded": fields.get("LoadState") == "loaded",
            "running": fields.get("ActiveState") == "active",
            "pid": int(pid) if pid.isdigit() and int(pid) > 0 else None,
            "last_exit": fields.get("ExecMainStatus") if exited else None,
        }

    def installed_environment(self) -> dict[str, str]:
        try:
            return read_environment(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def logs(self) -> list[str]:
        logs = [f"journalctl --user -u {self.name}"]
        if home := self.installed_environment().get("AGENTD_HOME"):
            logs.append(str(Path(home) / "log"))
        return logs


def manager_for(target: str, user_home: Path) -> Manager:
    return Launchd(user_home) if target == "launchd" else Systemd(user_home)
