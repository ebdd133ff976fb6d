"""Start the real `agentd` as a subprocess on a temp home and socket, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentctl.client import Client, ClientError


# Every daemon any test started, so the session can reap those a failing test left behind.
STARTED: list[subprocess.Popen] = []


def reap_all() -> None:
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class DaemonProc:
    def __init__(self, home: Path, model: Path, *args: str, env: dict | None = None):
        self.home = Path(home)
        self.socket = self.home / "run" / "agentd.sock"
        self.model = Path(model)
        self.args = list(args)
        # HTTP off unless a test asks (--http): parallel test daemons would race for the default port.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "AGENTD_HTTP": "off", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "daemon-stderr.log"

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "agentd", "--home", str(self.home / "data"), "--socket", str(self.socket),
                "--model", str(self.model), *self.args]

    def start(self, timeout: float = 60.0) -> "DaemonProc":
        self.home.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._err, stderr=self._err, env=self.env)
        STARTED.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                with Client(self.socket, timeout=5) as c:
                    c.ping()
                return self
            except ClientError:
                time.sleep(0.05)
        raise TimeoutError(f"agentd did not answer within {timeout}s:\n{self.stderr()}")

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_err"):
            self._err.close()

    def __enter__(self) -> "DaemonProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
