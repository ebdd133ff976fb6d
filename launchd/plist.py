"""The launchd user agent: a plist rendered from a ServiceSpec with plistlib."""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

from .spec import LABEL, STOP_TIMEOUT_SECONDS, THROTTLE_INTERVAL_SECONDS, ServiceSpec


def plist_path(user_home: Path, label: str = LABEL) -> Path:
    return user_home / "Library" / "LaunchAgents" / f"{label}.plist"


def render_plist(spec: ServiceSpec, label: str = LABEL) -> dict[str, Any]:
    """The agent's definition as a dict, ready for plistlib."""
    return {
        "Label": label,
        "ProgramArguments": spec.program_arguments(),
        "RunAtLoad": True,
        # Restart after a crash, but not after a clean exit (`agentctl stop` exits 0).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL_SECONDS,
        # Inference is latency-sensitive: never let launchd throttle it as Background.
        "ProcessType": "Interactive",
        # launchd sends SIGKILL after this; the final flush must fit inside it.
        "ExitTimeOut": STOP_TIMEOUT_SECONDS,
        "StandardOutPath": str(spec.stdout_path),
        "StandardErrorPath": str(spec.stderr_path),
        "EnvironmentVariables": spec.environment(),
    }


def plist_bytes(spec: ServiceSpec, label: str = LABEL) -> bytes:
    return plistlib.dumps(render_plist(spec, label), fmt=plistlib.FMT_XML, sort_keys=True)
