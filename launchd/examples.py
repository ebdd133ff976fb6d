"""Regenerate the example files beside this module: ``python -m agentctl.service.examples``.

They show what `agentctl service install` writes for a typical user; a test checks that
they match the renderers, so they cannot drift.
"""

from __future__ import annotations

from pathlib import Path

from .plist import plist_bytes
from .spec import LABEL, UNIT, ServiceSpec
from .systemd import render_unit

HERE = Path(__file__).resolve().parent

MACOS = ServiceSpec(
    python="/Users/you/.local/share/agentd/venv/bin/python",
    user_home=Path("/Users/you"),
    home=Path("/Users/you/Library/Application Support/agentd"),
    socket=Path("/var/folders/xy/abcd1234/T/agentd-501/agentd.sock"),
    log_dir=Path("/Users/you/Library/Logs/agentd"),
)

LINUX = ServiceSpec(
    python="/home/you/.local/share/agentd/venv/bin/python",
    user_home=Path("/home/you"),
    home=Path("/home/you/.local/state/agentd"),
    socket=Path("/run/user/1000/agentd/agentd.sock"),
    log_dir=Path("/home/you/.local/state/agentd/log"),
)


def examples() -> dict[Path, bytes]:
    return {
        HERE / f"{LABEL}.plist": plist_bytes(MACOS),
        HERE / UNIT: render_unit(LINUX).encode(),
    }


def main() -> None:
    for path, data in examples().items():
        path.write_bytes(data)
        print(path)


if __name__ == "__main__":
    main()
