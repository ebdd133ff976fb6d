"""agentd.notify, and the systemd unit's ExecStart run by hand with NOTIFY_SOCKET set.

Systemd is absent here, so the test plays its part: it listens on a datagram socket, passes
its address in NOTIFY_SOCKET, and waits for READY=1.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agentd.notify import notify
from agentctl.service.spec import build_spec
from agentctl.service.systemd import read_environment, read_exec_start, render_unit


def daemon_available() -> bool:
    try:
        return importlib.util.find_spec("agentd.cli") is not None
    except ImportError:
        return False


@pytest.fixture
def notify_socket():
    """A bound datagram socket playing systemd's part, and its address."""
    directory = tempfile.mkdtemp(prefix="agntfy-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def receive(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(4096)


def wait_for(sock: socket.socket, state: bytes, timeout: float) -> list[bytes]:
    """Datagrams up to and including one carrying ``state`` (one may hold several lines)."""
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {state!r} within {timeout} s; got {seen}")
        seen.append(receive(sock, remaining))
        if state in seen[-1].split(b"\n"):
            return seen


def run_notify(state: str, address: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from agentd.notify import notify; sys.exit(0 if notify(sys.argv[1]) else 1)"
    env = {**os.environ, "NOTIFY_SOCKET": address}
    return subprocess.run([sys.executable, "-c", code, state], env=env, capture_output=True, text=True, timeout=60)


def test_unset_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_ready_arrives_from_another_process(notify_socket):
    sock, path = notify_socket
    proc = run_notify("READY=1", path)
    assert proc.returncode == 0, proc.stderr
    assert receive(sock, 10) == b"READY=1"
    assert "mlx" not in proc.stderr


def test_several_states_arrive_in_order(notify_socket, monkeypatch):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") and notify("STATUS=serving") and notify("STOPPING=1")
    assert [receive(sock, 5) for _ in range(3)] == [b"READY=1", b"STATUS=serving", b"STOPPING=1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_address():
    name = f"agentd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        proc = run_notify("READY=1", "@" + name)
        assert proc.returncode == 0, proc.stderr
        assert receive(sock, 10) == b"READY=1"


def test_failures_return_false_and_never_raise(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify("READY=1") is False


def test_notify_imports_only_the_stdlib():
    code = "import sys, agentd.notify; bad = [m for m in ('mlx', 'numpy', 'click') if m in sys.modules]; assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not daemon_available(), reason="the daemon (agentd.cli) is not written yet")
def test_exec_start_of_the_unit_sends_ready_and_stopping(notify_socket, tmp_path, monkeypatch, request):
    """Start the daemon exactly as the systemd unit's ExecStart says, as systemd would."""
    sock, path = notify_socket
    model = os.environ.get("AGENTD_TEST_TINY_MODEL")
    if not model:
        try:
            model = str(request.getfixturevalue("tiny_llama_dir"))  # tests/conftest.py
        except pytest.FixtureLookupError:
            pytest.skip("no tiny model: set AGENTD_TEST_TINY_MODEL or provide the tiny_llama_dir fixture")
    short = Path(tempfile.mkdtemp(prefix="agsd-", dir="/tmp"))
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = build_spec(
        "systemd",
        home=tmp_path / "home",
        socket=short / "agentd.sock",
        model=model,
    )
    unit = render_unit(spec)
    argv = read_exec_start(unit)
    assert argv[0] == sys.executable
    env = {**os.environ, **read_environment(unit), "NOTIFY_SOCKET": path}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_for(sock, b"READY=1", 180)
        except TimeoutError:
            proc.kill()
            pytest.fail(f"no READY=1; daemon said:\n{proc.communicate()[0]}")
        assert (short / "agentd.sock").exists()  # READY only once the socket listens
        proc.send_signal(signal.SIGTERM)
        wait_for(sock, b"STOPPING=1", 60)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in short.iterdir():
            child.unlink()
        short.rmdir()
