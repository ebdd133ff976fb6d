"""Only the daemon's own user gets in, and no code path unpickles or evaluates data."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

import agentctl
import agentctl.service
import agentd
from agentctl.client import Client
from agentd import atomic
from agentd.peercred import parse_xucred, peer_uid
from agentd.server import HELLO_TIMEOUT_S, MAX_CONNECTIONS
from daemonproc import DaemonProc

NOBODY = 65534


def as_nobody(fn) -> str:
    """Run `fn` in a forked child that has become uid/gid nobody; returns what it reports."""
    if os.getuid() != 0:
        pytest.skip("switching to another user needs root")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    os.waitpid(pid, 0)
    return report


def connect_and_read(path: Path):
    def attempt() -> str:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return f"connected, then closed after {len(data)} bytes: {data[4:]!r}"

    return attempt


def test_another_user_cannot_reach_the_socket(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        report = as_nobody(connect_and_read(d.socket))
        assert report.startswith("PermissionError"), report
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600


def test_another_user_who_reaches_the_socket_is_refused_by_peer_credentials(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        # Open the filesystem guard on purpose, so the daemon's own uid check is what answers.
        os.chmod(home, 0o755)
        os.chmod(d.socket.parent, 0o755)
        os.chmod(d.socket, 0o777)
        try:
            report = as_nobody(connect_and_read(d.socket))
        finally:
            os.chmod(d.socket, 0o600)
            os.chmod(d.socket.parent, 0o700)
        assert report.startswith("connected, then closed"), report
        assert "agentd serves only its own user" in report
        assert "PERMISSION_DENIED" in report  # issue 16 item 14: a permission code, not BAD_REQUEST
        with d.client() as c:
            assert c.ping()["pong"]
        assert "refused a connection from uid 65534" in d.stderr()


def test_peer_uid_of_a_socketpair_is_our_own():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.getuid()
        assert peer_uid(b) == os.getuid()


def test_parse_xucred_reads_the_uid_of_a_macos_struct():
    # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
    groups = [20, 12, 61, 79, 80, 81, 98, 701, 33, 100, 204, 250, 395, 398, 399, 400]
    raw = struct.pack("=IIh2x16I", 0, 501, len(groups), *groups)
    assert len(raw) == 76  # what peer_uid asks getsockopt for on macOS
    assert parse_xucred(raw) == 501
    assert parse_xucred(struct.pack("=IIh2x16I", 0, 0, 1, 0, *[0] * 15)) == 0


FORBIDDEN = {
    "pickle": re.compile(r"\b(c?pickle|dill|shelve)\b"),
    "eval(": re.compile(r"(?<![\w.])eval\s*\("),  # mx.eval is MLX's graph evaluation, not Python's
    "exec(": re.compile(r"(?<![\w.])exec\s*\("),
    "marshal": re.compile(r"\bmarshal\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "compile(": re.compile(r"(?<![\w.])compile\s*\("),
}


def installed_sources() -> list[Path]:
    roots = {Path(m.__file__).parent for m in (agentd, agentctl, agentctl.service)}
    files = sorted({f for root in roots for f in root.rglob("*.py")})
    assert len(files) > 20
    return files


def test_no_code_path_unpickles_or_evaluates_data():
    hits = []
    for path in installed_sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    hits.append(f"{path}:{n}: {what}: {line.strip()}")
    assert hits == []


# ---- issue 16: what a hostile or careless local user broke -------------------------------


def start_refused(d: DaemonProc, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run agentd expecting it to refuse to start; returns the finished process."""
    d.home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(d.argv, capture_output=True, text=True, timeout=60, env={**d.env, **(env or {})})
    assert proc.returncode == 78, proc.stderr
    return proc


def test_issue16_item1_a_shared_socket_directory_is_refused_and_left_as_it_was(home, tiny_llama_dir):
    """issue 16 item 1: `--socket` in a 1777 directory turned it 0700. It must be refused and untouched."""
    shared = home / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    d = DaemonProc(home, tiny_llama_dir)
    d.socket = shared / "agentd.sock"
    proc = start_refused(d)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert "can be entered by other users" in proc.stderr and "Traceback" not in proc.stderr
    assert not d.socket.exists()


def test_issue16_item1_the_users_home_is_never_chmod_ed(home, tiny_llama_dir):
    """issue 16 item 1: `--socket ~/agentd.sock` turned the user's (0755) home into 0700."""
    user_home = home / "user"
    user_home.mkdir()
    os.chmod(user_home, 0o755)
    d = DaemonProc(home, tiny_llama_dir)
    d.socket = Path("~/agentd.sock")  # expanded by agentd, with HOME below
    start_refused(d, env={"HOME": str(user_home)})
    assert stat.S_IMODE(user_home.stat().st_mode) == 0o755


def test_issue16_item1_a_directory_agentd_creates_is_0700_and_a_private_one_is_accepted(home, tiny_llama_dir):
    """issue 16 item 1: what agentd may do: create its own 0700 directory, or use a private one as it is."""
    private = home / "mine"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    d = DaemonProc(home, tiny_llama_dir)
    d.socket = private / "made" / "deeper" / "agentd.sock"
    with d:
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(d.socket.parent.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def walk_modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_issue16_item2_a_fresh_home_and_everything_in_it_is_private(home, tiny_llama_dir):
    """issue 16 item 2: a home agentd created was 0755 with agents.db, its -wal/-shm, caches and the
    log world-readable. Every directory must be 0700 and every file 0600, whatever the umask."""
    old = os.umask(0o022)  # the usual login umask, inherited by the daemon
    try:
        d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    finally:
        os.umask(old)
    data = home / "data"
    try:
        with d.client() as c:
            c.create("a", system="a secret system prompt")
            list(c.chat("a", "my password is hunter2", max_tokens=4))
            assert c.save("a")["saved"] == ["a"]
        modes = walk_modes(data)
        assert {"agents.db", "agents.db-wal", "agents.db-shm", "caches/agents/a/manifest.json", "log/agentd.log"} <= set(modes)
        for path, mode in modes.items():
            expected = 0o700 if (data / path).is_dir() else 0o600
            assert mode == expected, f"{path} is {mode:o}"
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
    finally:
        assert d.stop() == 0
    assert all(mode in (0o700, 0o600) for mode in walk_modes(data).values())


def test_issue16_item3_a_link_planted_at_the_old_temp_path_is_not_written_through(home, tiny_llama_dir):
    """issue 16 item 3: a symlink at `<name>.partial.safetensors` made a save overwrite its target."""
    victim = home / "victim.txt"
    victim.write_text("precious")
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        caches = home / "data" / "caches"
        for name in ("a.partial.safetensors", "a.safetensors.partial", ".tmp-a.safetensors"):
            (caches / name).symlink_to(victim)
        with d.client() as c:
            c.create("a")
            list(c.chat("a", "hello", max_tokens=4))
            assert c.save("a")["saved"] == ["a"]
    assert victim.read_text() == "precious"
    assert (home / "data" / "caches" / "agents" / "a" / "manifest.json").is_file()


def test_issue16_item3_temp_files_are_created_exclusively_and_never_through_a_link(tmp_path, monkeypatch):
    """issue 16 item 3: even at a temp name someone guessed, atomic_replace refuses a planted link."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "x.safetensors"
    planted = tmp_path / ".tmp-guessed-x.safetensors"
    planted.symlink_to(victim)
    monkeypatch.setattr(atomic, "temp_path", lambda path, keep_suffix=True: planted)
    with pytest.raises(FileExistsError):
        atomic.atomic_write_bytes(target, b"data")
    assert victim.read_text() == "precious" and not target.exists()
    planted.unlink()
    planted.symlink_to(tmp_path / "missing")  # a dangling link: O_CREAT alone would create its target
    with pytest.raises(FileExistsError):
        atomic.atomic_write_bytes(target, b"data")
    assert not (tmp_path / "missing").exists()
    # Reopening a temp file for a writer refuses a link put in its place.
    planted.unlink()
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        atomic.open_for_write(planted)
    assert victim.read_text() == "precious"


def test_issue16_item4_half_open_connections_cannot_lock_out_ping_and_status(home, tiny_llama_dir):
    """issue 16 item 4: 64 connections that each sent one byte locked out ping and status until the
    300 s idle timeout. They are dropped after the hello timeout and never fill the limit."""
    with DaemonProc(home, tiny_llama_dir) as d:
        stalled = []
        for _ in range(MAX_CONNECTIONS + 16):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.socket))
            s.sendall(b"\x00")  # the first byte of a frame header, then nothing
            stalled.append(s)
        try:
            with Client(d.socket, timeout=10) as c:
                assert c.ping()["pong"]
                assert c.status()["pid"] == d.proc.pid
            # And the stalled ones are closed by the daemon once their hello is overdue.
            deadline = time.monotonic() + HELLO_TIMEOUT_S + 20
            for s in stalled:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    assert s.recv(4096) == b""
                except ConnectionResetError:
                    pass  # the oldest ones were aborted to make room: closed just the same
        finally:
            for s in stalled:
                s.close()
        with Client(d.socket, timeout=10) as c:
            assert c.ping()["pong"]
