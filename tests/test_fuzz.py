"""Hostile and broken clients against one long-lived real daemon: whatever arrives on the
socket gets an error frame or a closed connection, never an INTERNAL error or a crash, and
`ping` answers after every example. Clients that stall hold nothing past the idle timeout."""

from __future__ import annotations

import socket
import struct
import time

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd import protocol as p
from agentd import responses
from agentd.framing import HEADER
from daemonproc import DaemonProc

IDLE = 1.0
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
OPS = sorted(set(p.REQUEST_TYPES) - {"shutdown"})  # a well-formed shutdown would end the module's daemon
NAMED = sorted(op for op in OPS if "name" in {f.name for f in p.REQUEST_TYPES[op].__dataclass_fields__.values()})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    import tempfile
    from pathlib import Path

    home = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
    d = DaemonProc(home, tiny_llama_dir, "--idle-timeout", str(IDLE), "--flush-interval", "3600").start()
    with d.client() as c:
        c.create("fuzz", system="You are a fuzzing target.")
    yield d
    d.kill()
    log = d.stderr()
    assert "Traceback" not in log, log[-3000:]


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


HELLO = frame({"id": 0, "op": "hello", "protocol": p.PROTOCOL_VERSION})


def read_frames(s: socket.socket) -> list[dict]:
    """Every frame until the daemon closes the connection."""
    buf = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    frames = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", buf[:4])
        assert len(buf) >= 4 + n, "the daemon sent a torn frame"
        frames.append(msgpack.unpackb(buf[4 : 4 + n], raw=False))
        buf = buf[4 + n :]
    assert buf == b""
    return frames


def exchange(d: DaemonProc, payload: bytes, greet: bool = True) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(d.socket))
    try:
        s.sendall((HELLO if greet else b"") + payload)
        s.shutdown(socket.SHUT_WR)  # EOF after the payload: a truncated frame is answered at once
        frames = read_frames(s)
    finally:
        s.close()
    if greet:
        assert frames[0]["type"] == "result" and frames[0]["protocol"] == p.PROTOCOL_VERSION
        frames = frames[1:]
    return frames


def still_serving(d: DaemonProc, frames: list[dict]) -> None:
    for f in frames:
        parsed = responses.response_from_wire(f)  # every frame is well-formed
        if isinstance(parsed, responses.Error):
            assert parsed.code != "INTERNAL", parsed
            assert p.ErrorCode(parsed.code)
    if frames:
        assert frames[-1]["type"] in ("result", "error")  # the last one is terminal
    assert d.proc.poll() is None, "the daemon died"
    with d.client(timeout=10) as c:
        assert c.ping()["pong"] is True


# ---- strategies ---------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=30,
)
bad_names = st.one_of(
    st.sampled_from(["../x", "", "x" * 10_000, "a\0b", ".hidden", "a/b", "..", "con\n", "é", " "]),
    st.text(max_size=80),
    values,
)


def not_shutdown(obj) -> bool:
    return not (isinstance(obj, dict) and obj.get("op") == "shutdown")


# ---- the properties -----------------------------------------------------------------


@FUZZ
@given(payload=st.binary(min_size=1, max_size=600), greet=st.booleans())
def test_random_bytes(daemon, payload, greet):
    still_serving(daemon, exchange(daemon, payload, greet))


@FUZZ
@given(obj=values.filter(not_shutdown), greet=st.booleans())
def test_arbitrary_msgpack_values(daemon, obj, greet):
    still_serving(daemon, exchange(daemon, frame(obj), greet))


@FUZZ
@given(op=st.sampled_from(OPS), data=st.data())
def test_truncated_frames(daemon, op, data):
    whole = frame({"id": 7, "op": op, "name": "fuzz", "message": "hi there", "protocol": 1})
    cut = data.draw(st.integers(1, len(whole) - 1))
    frames = exchange(daemon, whole[:cut])
    assert [f.get("code") for f in frames] == ["BAD_FRAME"]
    still_serving(daemon, frames)


@FUZZ
@given(length=st.one_of(st.integers(p.MAX_FRAME_BYTES + 1, 2**32 - 1), st.just(2**32 - 1)),
       tail=st.binary(max_size=64), greet=st.booleans())
def test_oversized_length_headers(daemon, length, tail, greet):
    frames = exchange(daemon, HEADER.pack(length) + tail, greet)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "BAD_FRAME")]  # checked before the body
    still_serving(daemon, frames)


@FUZZ
@given(depth=st.integers(50, 200_000), kind=st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deeply_nested_msgpack(daemon, depth, kind):
    body = kind * depth + b"\xc0"
    if len(body) > p.MAX_FRAME_BYTES:
        body = body[: p.MAX_FRAME_BYTES]
    frames = exchange(daemon, HEADER.pack(len(body)) + body)
    still_serving(daemon, frames)


@FUZZ
@given(op=st.sampled_from(OPS), rid=values, fields=st.dictionaries(st.text(max_size=12), values, max_size=6))
def test_wrong_typed_requests(daemon, op, rid, fields):
    frames = exchange(daemon, frame({**fields, "id": rid, "op": op}))
    still_serving(daemon, frames)


@FUZZ
@given(op=st.one_of(st.text(max_size=30), values).filter(lambda o: not isinstance(o, str) or o not in p.REQUEST_TYPES))
def test_unknown_ops(daemon, op):
    frames = exchange(daemon, frame({"id": 3, "op": op}))
    assert [f["code"] for f in frames] == ["UNKNOWN_OP" if isinstance(op, str) else "BAD_REQUEST"]
    still_serving(daemon, frames)


@FUZZ
@given(version=st.one_of(values, st.integers(-(2**63), 2**64 - 1)).filter(lambda v: v != p.PROTOCOL_VERSION or isinstance(v, bool)))
def test_wrong_protocol_versions_in_hello(daemon, version):
    frames = exchange(daemon, frame({"id": 1, "op": "hello", "protocol": version}), greet=False)
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] in ("PROTOCOL_MISMATCH", "BAD_REQUEST")
    still_serving(daemon, frames)


@FUZZ
@given(op=st.sampled_from(NAMED), name=bad_names)
def test_bad_agent_names(daemon, op, name):
    frames = exchange(daemon, frame({"id": 5, "op": op, "name": name, **({"message": "hi"} if op == "chat" else {})}))
    try:
        p.validate_agent_name(name)
        valid = True
    except p.ProtocolError:
        valid = False
    if not valid:
        assert frames[-1]["type"] == "error"
        assert frames[-1]["code"] in ("INVALID_NAME", "BAD_REQUEST")
    else:  # text() can draw a valid name ("COM1"): then create succeeds once
        assert frames[-1]["type"] == "result" or frames[-1]["code"] in ("NOT_FOUND", "ALREADY_EXISTS", "BAD_REQUEST")
    still_serving(daemon, frames)
    assert not any(daemon.home.glob("**/..*")) and not (daemon.home / "x.safetensors").exists()


@FUZZ
@given(
    max_tokens=st.one_of(st.integers(-(2**63), 0), st.integers(p.MAX_TOKENS_LIMIT + 1, 2**64 - 1), st.booleans(),
                         st.floats(), st.text(max_size=5)),
    temperature=st.one_of(st.floats().filter(lambda t: not 0 <= t <= p.MAX_TEMPERATURE), st.text(max_size=3)),
    seed=st.one_of(st.integers(-(2**63), -1), st.integers(p.MAX_SEED + 1, 2**64 - 1),
                   st.floats()),
    which=st.sets(st.sampled_from(["max_tokens", "temperature", "seed"]), min_size=1),
)
def test_out_of_range_chat_options(daemon, max_tokens, temperature, seed, which):
    bad = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    frames = exchange(daemon, frame({"id": 9, "op": "chat", "name": "fuzz", "message": "hi",
                                     **{k: bad[k] for k in which}}))
    assert [(f["type"], f["code"]) for f in frames] == [("error", "BAD_REQUEST")]
    still_serving(daemon, frames)


# ---- clients that stall -------------------------------------------------------------


def open_fds(d: DaemonProc) -> int:
    return psutil.Process(d.proc.pid).num_fds()


def closed_by_daemon(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while s.recv(1 << 16):
            pass
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x00\x00", HEADER.pack(100) + b"half a bo", HELLO, HELLO + HEADER.pack(50)],
    ids=["silent", "half-header", "half-body", "idle-after-hello", "header-after-hello"],
)
def test_a_stalled_client_is_closed_after_the_idle_timeout(daemon, sent):
    before = open_fds(daemon)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(sent)
    t = time.monotonic()
    assert closed_by_daemon(s, within=IDLE + 4), "the daemon kept a stalled connection open"
    assert IDLE * 0.8 <= time.monotonic() - t
    s.close()
    assert wait_until(lambda: open_fds(daemon) <= before)
    still_serving(daemon, [])


def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(daemon):
    """Replies pile up unread (here: 1 MiB system prompts): the daemon must not wait forever to write."""
    with daemon.client() as c:
        if "big" not in [a["name"] for a in c.list()["agents"]]:
            c.create("big", system="x" * p.MAX_TEXT_BYTES)
    before = open_fds(daemon)
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(daemon.socket))
    s.sendall(HELLO + b"".join(frame({"id": i, "op": "show", "name": "big"}) for i in range(1, 4)))
    time.sleep(IDLE + 3)  # read nothing
    assert open_fds(daemon) <= before, "the daemon still holds the connection of a client that stopped reading"
    s.close()
    still_serving(daemon, [])


def test_a_client_that_leaves_mid_stream_is_not_an_error_in_the_log(daemon):
    mark = len(daemon.stderr())
    with daemon.client() as c:
        stream = c.chat("fuzz", "tell me everything", max_tokens=2000)
        next(iter(stream))
        stream.close()
    with daemon.client() as c:
        assert c.ping()["pong"]
        c.save()  # queued behind the cancelled job: it has ended once this returns
    assert "Traceback" not in daemon.stderr()[mark:]


def wait_until(probe, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
