"""Where agentd keeps its files, by platform convention, each overridable.

KV snapshots are expensive to rebuild, so they live under state/application data, never a
cache directory the system may purge.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import platformdirs

APP = "agentd"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# sun_path holds 104 bytes on macOS and 108 on Linux, each including the NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def default_home() -> Path:
    """Data, records, caches and converted models: $AGENTD_HOME, else the platform's place."""
    if env := os.environ.get("AGENTD_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path(platformdirs.user_data_dir(APP, appauthor=False))
    return Path(platformdirs.user_state_dir(APP, appauthor=False))


def default_log_dir(home: Path | None = None) -> Path:
    """~/Library/Logs/agentd on macOS; beside the data on Linux."""
    if sys.platform == "darwin":
        return Path(platformdirs.user_log_dir(APP, appauthor=False))
    return (home or default_home()) / "log"


def default_socket() -> Path:
    """$AGENTD_SOCKET, else a short runtime directory (socket paths are length-limited)."""
    if env := os.environ.get("AGENTD_SOCKET"):
        return Path(env).expanduser()
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / APP / "agentd.sock"
    # macOS has no per-user runtime dir; $TMPDIR is per-user and private there.
    base = os.environ.get("TMPDIR") if sys.platform == "darwin" else tempfile.gettempdir()
    return Path(base or "/tmp") / f"{APP}-{os.getuid()}" / "agentd.sock"


def models_dir(home: Path) -> Path:
    return home / "models"


def default_model_dir(home: Path | None = None) -> Path:
    """The converted default model: $AGENTD_MODEL, else models/SmolLM2-135M-Instruct in the home."""
    if env := os.environ.get("AGENTD_MODEL"):
        return Path(env).expanduser()
    return models_dir(home or default_home()) / DEFAULT_MODEL_NAME
