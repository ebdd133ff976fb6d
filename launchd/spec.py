"""What a service definition says, independent of launchd or systemd.

Both renderers read one ServiceSpec, so the plist and the unit cannot disagree about the
command line, the paths or the environment.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from agentd import paths

LABEL = "com.agentd.agentd"
UNIT = "agentd.service"
TARGETS = ("launchd", "systemd")

# The daemon flushes every dirty agent first, then gives replies in flight at most
# agentd.server.DRAIN_TIMEOUT_S (5 s) and closes every connection: the service manager
# must wait that long before it escalates to SIGKILL, which leaves the flush ~50 s.
STOP_TIMEOUT_SECONDS = 60
# launchd waits at least this long between two launches of a crashing daemon.
THROTTLE_INTERVAL_SECONDS = 10


def default_target() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a launchd agent or a systemd unit for agentd is rendered from.

    Every path is absolute: launchd's PATH is bare and neither manager expands ``~``.
    """

    python: str  # interpreter of the environment agentd is installed in
    user_home: Path  # $HOME of the user the service runs as
    home: Path  # AGENTD_HOME
    socket: Path  # AGENTD_SOCKET
    log_dir: Path  # where launchd sends stdout/stderr
    model: Path | None = None  # AGENTD_MODEL, only when given

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "stderr.log"

    def program_arguments(self) -> list[str]:
        # The socket is pinned rather than left to the daemon's default: launchd's and
        # systemd's environments differ from the shell's (TMPDIR, XDG_RUNTIME_DIR), and the
        # client must find the socket the daemon listens on.
        args = [self.python, "-m", "agentd", "--home", str(self.home), "--socket", str(self.socket)]
        if self.model is not None:
            args += ["--model", str(self.model)]
        return args

    def environment(self) -> dict[str, str]:
        env = {
            "PYTHONUNBUFFERED": "1",
            "HOME": str(self.user_home),
            "AGENTD_HOME": str(self.home),
            "AGENTD_SOCKET": str(self.socket),
        }
        if self.model is not None:
            env["AGENTD_MODEL"] = str(self.model)
        return env


def _absolute(path: str | os.PathLike[str]) -> Path:
    # absolute(), not resolve(): keep the user's symlinks, never make a relative path.
    return Path(path).expanduser().absolute()


def build_spec(
    target: str,
    *,
    home: str | os.PathLike[str] | None = None,
    socket: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    python: str | None = None,
) -> ServiceSpec:
    """The spec for this user and this environment; flags win over AGENTD_* variables.

    ``python`` defaults to ``sys.executable`` unresolved: resolving a venv's ``python``
    symlink would name the base interpreter and lose the venv.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    user_home = Path.home()
    agentd_home = _absolute(home) if home else _absolute(paths.default_home())
    sock = _absolute(socket) if socket else _absolute(paths.default_socket())
    if model is None and os.environ.get("AGENTD_MODEL"):
        model = os.environ["AGENTD_MODEL"]
    if target == "launchd":
        log_dir = user_home / "Library" / "Logs" / paths.APP
    else:
        log_dir = agentd_home / "log"
    return ServiceSpec(
        python=python or sys.executable,
        user_home=user_home,
        home=agentd_home,
        socket=sock,
        log_dir=log_dir,
        model=_absolute(model) if model else None,
    )


def max_socket_path(target: str) -> int:
    # sun_path is 104 bytes on macOS, 108 on Linux, NUL included.
    return 103 if target == "launchd" else 107
