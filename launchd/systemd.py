"""The systemd user unit: text rendered from a ServiceSpec, and read back."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from agentd.cli import EX_CONFIG

from .spec import STOP_TIMEOUT_SECONDS, THROTTLE_INTERVAL_SECONDS, UNIT, ServiceSpec

# Loading the model on a CPU can take a while; READY=1 comes only after it.
START_TIMEOUT_SECONDS = 300

_NEEDS_QUOTES = re.compile(r'[\s"\'\\;]')


def unit_path(user_home: Path, unit: str = UNIT) -> Path:
    return user_home / ".config" / "systemd" / "user" / unit


def _quote(word: str, *, dollar: bool) -> str:
    # "%" starts a specifier everywhere in a unit; "$" expands variables in Exec lines only.
    word = word.replace("%", "%%")
    if dollar:
        word = word.replace("$", "$$")
    if word and not _NEEDS_QUOTES.search(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: list[str]) -> str:
    return " ".join(_quote(arg, dollar=True) for arg in argv)


def render_unit(spec: ServiceSpec) -> str:
    env = "".join(
        f"Environment={_quote(f'{key}={value}', dollar=False)}\n"
        for key, value in spec.environment().items()
    )
    return (
        "[Unit]\n"
        "Description=agentd: LLM agents whose KV caches survive restarts\n"
        "\n"
        "[Service]\n"
        # READY=1 once the model is loaded and the socket listens (agentd.notify).
        "Type=notify\n"
        f"ExecStart={exec_line(spec.program_arguments())}\n"
        f"{env}"
        "Restart=on-failure\n"
        f"RestartSec={THROTTLE_INTERVAL_SECONDS}\n"
        # agentd exits EX_CONFIG (78) for a missing model or unreadable records: retrying
        # every 10 s cannot fix those, so systemd should not.
        f"RestartPreventExitStatus={EX_CONFIG}\n"
        f"TimeoutStartSec={START_TIMEOUT_SECONDS}\n"
        # The final flush of every dirty agent must finish before SIGKILL.
        f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def _unquote(value: str) -> list[str]:
    return [word.replace("%%", "%") for word in shlex.split(value)]


def read_exec_start(unit_text: str) -> list[str]:
    """ExecStart= of a unit this module rendered, as an argv."""
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            return [word.replace("$$", "$") for word in _unquote(line[len("ExecStart=") :])]
    raise ValueError("no ExecStart= line")


def read_environment(unit_text: str) -> dict[str, str]:
    """Environment= assignments of a unit this module rendered."""
    env: dict[str, str] = {}
    for line in unit_text.splitlines():
        if line.startswith("Environment="):
            for assignment in _unquote(line[len("Environment=") :]):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env
