"""The real daemon as a subprocess, driven over its socket by `Client` and `agentctl`."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys

import msgpack
import pytest

from agentctl.client import AgentdError, Client
from daemonproc import DaemonProc

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them."
TURN1 = "The payment API returns a 500 error when the card token expires during checkout."
TURN2 = "What are the detailed steps to fix that API bug from our previous discussion?"


def chat(client, name, message, max_tokens=16):
    stream = client.chat(name, message, max_tokens=max_tokens)
    pieces = list(stream)
    result = stream.wait()
    assert "".join(pieces) == result["text"]
    return result


def test_exact_resume_across_a_daemon_restart(home, tiny_model_dir):
    with DaemonProc(home, tiny_model_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            for name in ("x", "twin"):
                c.create(name, role="Technical Specialist", system=SYSTEM)
                chat(c, name, TURN1)
            # The twin answers turn 2 without ever leaving memory.
            in_memory = chat(c, "twin", TURN2, max_tokens=24)
        assert d.stop() == 0  # SIGTERM: flushes x and twin
    with DaemonProc(home, tiny_model_dir) as d:
        with d.client() as c:
            # The start made the memory of both agents' next restores ready (the CPU's reserve).
            reserve = c.status()["memory"]["restore_reserve"]
            assert reserve["agents"] == 2 and reserve["bytes"] > 0, reserve
            resumed = chat(c, "x", TURN2, max_tokens=24)
        # This machine has a C compiler: the restore read and checked its rows in C (readhash).
        assert "restores read and check in C" in d.stderr()
    assert in_memory["cache_source"] in ("memory", "rebuilt")
    assert resumed["cache_source"] == ("disk" if in_memory["cache_source"] == "memory" else "rebuilt")
    assert resumed["text"] == in_memory["text"]
    assert resumed["cached_tokens"] == in_memory["cached_tokens"]


def test_sigterm_flushes_dirty_agents_removes_the_socket_and_exits_0(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    try:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", TURN1)
            assert c.status()["agents"][0]["dirty"] is True
        cache = home / "data" / "caches" / "agents" / "a" / "manifest.json"
        assert not cache.exists()
        assert d.stop(signal.SIGTERM) == 0
        assert cache.exists()
        assert not d.socket.exists()
    finally:
        d.kill()


def test_eviction_under_max_hot_2_and_the_evicted_agent_resumes_exactly(home, tiny_llama_dir, tmp_path):
    def scenario(daemon):
        with daemon.client() as c:
            for name in ("a", "b", "c"):
                c.create(name, system=f"{SYSTEM} You are agent {name}.")
                chat(c, name, TURN1)
            states = {a["name"]: a["state"] for a in c.status()["agents"]}
            again = chat(c, "a", TURN2)
        return states, again

    with DaemonProc(tmp_path / "roomy", tiny_llama_dir) as d:
        roomy_states, reference = scenario(d)
    with DaemonProc(home, tiny_llama_dir, "--max-hot", "2") as d:
        states, evicted_then_resumed = scenario(d)
        assert (home / "data" / "caches" / "agents" / "a" / "manifest.json").exists()
    assert roomy_states == {"a": "hot", "b": "hot", "c": "hot"}
    assert states == {"a": "cold", "b": "hot", "c": "hot"}
    assert reference["cache_source"] == "memory"
    assert evicted_then_resumed["cache_source"] == "disk"
    assert evicted_then_resumed["text"] == reference["text"]


def test_a_second_daemon_refuses_to_start(home, tiny_llama_dir, tmp_path):
    with DaemonProc(home, tiny_llama_dir) as first:
        same_socket = DaemonProc(tmp_path / "other", tiny_llama_dir)
        same_socket.socket = first.socket
        r = subprocess.run(same_socket.argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 78
        assert "already listening" in r.stderr
        assert "Traceback" not in r.stderr
        same_home = DaemonProc(home, tiny_llama_dir)
        same_home.socket = tmp_path / "s2" / "sock"
        r = subprocess.run(same_home.argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 78 and "already running" in r.stderr
        with first.client() as c:
            assert c.ping()["pong"] is True


def test_a_stale_socket_is_replaced(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir)
    d.socket.parent.mkdir(parents=True, mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d.socket))
    stale.close()  # bound, never listening: what a crashed daemon leaves behind
    with d.start():
        with d.client() as c:
            assert c.ping()["pong"] is True


def test_socket_is_private(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700


def test_overlong_socket_path_is_a_clear_error(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir)
    d.socket = home / ("x" * 120) / "sock"
    r = subprocess.run(d.argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 78
    assert "socket path is" in r.stderr and "Traceback" not in r.stderr


def _raw(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _read_frame(s):
    header = b""
    while len(header) < 4:
        chunk = s.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (n,) = struct.unpack(">I", header)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return msgpack.unpackb(body)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x05hello",  # not msgpack
        struct.pack(">I", 2**32 - 1) + b"xx",  # oversized length, checked before the body
        struct.pack(">I", 3) + msgpack.packb([1, 2]),  # not a map
        struct.pack(">I", 100) + b"short",  # then EOF mid-frame
        os.urandom(64),
    ],
    ids=["not-msgpack", "oversized", "not-a-map", "truncated", "random"],
)
def test_garbage_frames_get_an_error_or_a_close_and_the_daemon_keeps_serving(home, tiny_llama_dir, payload):
    with DaemonProc(home, tiny_llama_dir) as d:
        s = _raw(d.socket)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = _read_frame(s)
        assert reply is None or (reply["type"] == "error" and reply["code"] in ("BAD_FRAME", "BAD_REQUEST"))
        s.close()
        with d.client() as c:
            assert c.ping()["pong"] is True


def test_unknown_op_and_missing_hello_are_errors_not_crashes(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        s = _raw(d.socket)
        body = msgpack.packb({"id": 1, "op": "status"})
        s.sendall(struct.pack(">I", len(body)) + body)
        assert _read_frame(s)["code"] == "PROTOCOL_MISMATCH"  # hello first
        body = msgpack.packb({"id": 2, "op": "launch-missiles"})
        s.sendall(struct.pack(">I", len(body)) + body)
        assert _read_frame(s) == {"id": 2, "type": "error", "code": "UNKNOWN_OP", "message": _read_msg("launch-missiles")}
        s.close()
        with d.client() as c:
            assert c.ping()["pong"] is True
            with pytest.raises(AgentdError) as err:
                c.chat("nobody", "hi").wait()
            assert err.value.code == "NOT_FOUND"


def _read_msg(op):
    from agentd import protocol as p

    try:
        p.request_from_wire({"id": 2, "op": op})
    except p.ProtocolError as e:
        return e.message


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            stream = c.chat("a", TURN1, max_tokens=8192)
            next(iter(stream))
            stream.close()  # drops the connection
        with d.client() as c:
            # Queued behind the abandoned job on the MLX worker: if that job ran to its
            # 8192 tokens, its turn would be in the history before this one.
            chat(c, "a", TURN2, max_tokens=4)
            history = c.history("a")["messages"]
        assert [m["content"] for m in history if m["role"] == "user"] == [TURN2]


def test_agentctl_json_chat_and_status_shapes(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "agentctl.cli", "--socket", str(d.socket), "--json", *a],
            capture_output=True, text=True, timeout=60,
        )
        assert run("create", "spec", "--role", "Technical Specialist", "--system", SYSTEM).returncode == 0
        r = run("chat", "spec", TURN1, "--max-tokens", "5")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        for key in ("text", "cached_tokens", "prefilled_tokens", "generated_tokens", "cache_source", "restore_ms",
                    "ttft_ms", "decode_tokens_per_s"):
            assert key in out
        assert out["cache_source"] == "new" and out["generated_tokens"] <= 5
        status = json.loads(run("status").stdout)
        agent = status["agents"][0]
        assert {k: agent[k] for k in ("name", "state", "dirty")} == {"name": "spec", "state": "hot", "dirty": True}
        assert agent["tokens"] > 0 and agent["bytes"] > 0
        assert {"model_bytes", "cache_bytes", "system_available"} <= set(status["memory"])
        # Made at start for the agents used last: none had been saved yet.
        assert {k: status["memory"]["restore_reserve"][k] for k in ("agents", "bytes")} == {"agents": 0, "bytes": 0}
        bad = run("create", "../etc")
        assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_fork_copies_the_transcript_and_starts_from_the_sources_saved_cache(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", role="Technical Specialist", system=SYSTEM)
            chat(c, "a", TURN1)
            forked = c.fork("a", "b")["agent"]
            assert (forked["name"], forked["role"], forked["messages"]) == ("b", "Technical Specialist", 2)
            assert c.history("b") == c.history("a")
            fork = chat(c, "b", TURN2)
            resumed = chat(c, "a", TURN2)
            # The fork shares the source's saved blocks and tail: nothing is prefilled twice.
            assert (fork["cache_source"], resumed["cache_source"]) == ("disk", "memory")
            assert fork["prompt_tokens"] == resumed["prompt_tokens"]
            assert fork["prefilled_tokens"] == resumed["prefilled_tokens"] < fork["prompt_tokens"]
            assert fork["text"] == resumed["text"]
            with pytest.raises(AgentdError) as err:
                c.fork("nobody", "c")
            assert err.value.code == "NOT_FOUND"
            with pytest.raises(AgentdError) as err:
                c.fork("a", "b")
            assert err.value.code == "ALREADY_EXISTS"


def test_chat_rebuild_prefills_the_whole_transcript_and_answers_the_same(home, tiny_llama_dir):
    """`chat --rebuild` ignores the hot cache and the stored blocks (the demo's and ttft's
    "rebuilt" baseline now that forks share blocks): the whole prompt is prefilled, the
    result says so, and a greedy reply is the one the cached agent gives."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", TURN1)
            c.save("a")
            c.fork("a", "b")
            cached = chat(c, "a", TURN2)
            rebuilt = c.chat("b", TURN2, max_tokens=cached["generated_tokens"] or 1, rebuild=True).wait()
            assert cached["cache_source"] == "memory" and cached["cached_tokens"] > 0
            assert rebuilt["cache_source"] == "rebuilt"
            assert (rebuilt["cached_tokens"], rebuilt["prefilled_tokens"]) == (0, rebuilt["prompt_tokens"])
            assert rebuilt["prompt_tokens"] == cached["prompt_tokens"]
            assert rebuilt["text"] == cached["text"]
        out = subprocess.run([sys.executable, "-m", "agentctl.cli", "--socket", str(d.socket), "--json", "chat",
                              "a", "--rebuild", "--max-tokens", "4", "once more"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["cache_source"] == "rebuilt"


def test_a_rebuild_of_a_cold_agent_does_not_read_its_stored_cache(home, tiny_llama_dir):
    """A rebuild is asked for when the stored cache is in doubt: a cold agent's files are
    not read (here every one of them is damaged, and nothing is reported or moved aside)."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", TURN1)
            c.save("a")
            c.fork("a", "b")  # cold, sharing a's blocks and a copy of its tail
            damaged = [f for f in (home / "data" / "caches").rglob("*") if f.is_file() and f.suffix != ".json"]
            assert damaged
            for f in damaged:
                data = bytearray(f.read_bytes())
                data[len(data) // 2] ^= 0xFF
                f.write_bytes(bytes(data))
            r = c.chat("b", TURN2, max_tokens=3, rebuild=True).wait()
            assert (r["cache_source"], r["cached_tokens"], r["restore_ms"]) == ("rebuilt", 0, 0.0)
            assert c.status()["problems"] == []
            assert c.show("b")["agent"]["messages"] == 4
