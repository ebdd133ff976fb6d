"""Files the cache repository refuses to load: moved aside into `quarantine/`, never
deleted (a user may want to inspect them), and the last MAX_PROBLEMS remembered for
`status`. The block store moves its own refused blocks into the same folder."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agentd.cacherepo")

MAX_PROBLEMS = 20


@dataclass
class CacheProblem:
    """A refused manifest, block, tail or v1 file: shown in status, kept in quarantine."""

    agent: str
    reason: str
    message: str
    moved_to: str
    at: float


class Quarantine:
    def __init__(self, directory: Path):
        self.dir = directory
        self.problems: list[CacheProblem] = []

    def move_aside(self, path: Path, name: str, reason: str) -> str:
        """Move `name`'s refused file here; where it is now (unmoved if the move failed)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        dest = self.dir / f"{name}.{int(time.time() * 1000)}.{reason}.{path.name}"
        try:
            os.replace(path, dest)
            return str(dest)
        except OSError as e:
            log.error("agent %s: cannot move %s aside: %s", name, path.name, e)
            return str(path)

    def report(self, name: str, reason: str, message: str, moved_to: str) -> None:
        log.warning("agent %s: cache refused (%s), rebuilding from its transcript: %s", name, reason, message)
        self.problems.append(CacheProblem(name, reason, message, moved_to, time.time()))
        del self.problems[:-MAX_PROBLEMS]

    def refuse(self, path: Path, name: str, reason: str, message: str) -> None:
        """Move the file aside and report it."""
        self.report(name, reason, message, self.move_aside(path, name, reason))
