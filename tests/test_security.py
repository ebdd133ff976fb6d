"""Only the daemon's own user gets in, and no code path unpickles or evaluates data."""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
from pathlib import Path

import pytest

import agentctl
import agentctl.service
import agentd
from agentd.peercred import parse_xucred, peer_uid
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
