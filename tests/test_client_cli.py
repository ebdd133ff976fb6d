"""agentctl and its Client without a real daemon: import hygiene, help, the not-running path,
rendering, and (against a minimal scripted responder) the chat stream and --json shapes.

Real behaviour is tested end to end against the daemon elsewhere; the responder here is only
a stand-in so the CLI's rendering can be checked before the daemon exists. Keep it small.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentctl import AgentdError, Client, ConnectionLost, DaemonNotRunning
from agentctl import render
from agentctl.cli import cli
from agentd import protocol as p
from agentd import responses
from agentd.framing import recv_frame, send_frame

PY = sys.executable
AGENTCTL = str(Path(sys.executable).parent / "agentctl")
COMMANDS = ["status", "ping", "create", "list", "show", "history", "delete", "reset", "chat", "save", "evict", "stop"]


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env})


NO_MLX = "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')); assert not bad, bad"


def test_imports_leave_mlx_out():
    proc = _run_py(
        "import sys\n"
        "import agentctl, agentd.protocol, agentd.framing, agentctl.cli, agentctl.render\n"
        "from agentctl import Client, AgentdError, DaemonNotRunning\n" + NO_MLX
    )
    assert proc.returncode == 0, proc.stderr


def test_help_of_every_command_leaves_mlx_out():
    args = [["--help"]] + [[c, "--help"] for c in COMMANDS]
    proc = _run_py(
        "import sys\n"
        "from agentctl.cli import cli\n"
        f"for args in {args!r}:\n"
        "    try:\n"
        "        cli.main(args, prog_name='agentctl')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "print('listed:', ' '.join(cli.list_commands(None)))\n" + NO_MLX
    )
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert f"Usage: agentctl {command}" in proc.stdout
    listed = proc.stdout.rsplit("listed:", 1)[1].split()
    assert set(COMMANDS) <= set(listed)


def test_optional_commands_help_if_present():
    """`service` and `demo` come from other modules; when present their help works without mlx."""
    from agentctl.cli import _OPTIONAL_COMMANDS, _module_exists

    present = [name for name, (module, _) in _OPTIONAL_COMMANDS.items() if _module_exists(module)]
    if not present:
        pytest.skip("no optional command modules yet")
    for name in present:
        proc = _run_py(
            "import sys\nfrom agentctl.cli import cli\n"
            f"try:\n    cli.main([{name!r}, '--help'], prog_name='agentctl')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n" + NO_MLX
        )
        assert proc.returncode == 0, (name, proc.stderr)


def test_console_script_help():
    proc = subprocess.run([AGENTCTL, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Usage: agentctl" in proc.stdout


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="ac-", dir="/tmp"))  # short: sun_path is length-limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_status_without_daemon_says_so_in_one_line(sockdir):
    proc = subprocess.run(
        [AGENTCTL, "--socket", str(sockdir / "none.sock"), "status"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: agentd is not running")
    assert "agentctl service install" in lines[0]


def test_stale_socket_is_not_running_and_json_error_shape(sockdir):
    path = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: connect is refused
    s.close()
    result = CliRunner().invoke(cli, ["--socket", str(path), "--json", "ping"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"]["code"] == "DAEMON_NOT_RUNNING"
    assert result.stderr.startswith("Error: agentd is not running")
    with pytest.raises(DaemonNotRunning):
        Client(path).ping()


def test_invalid_name_is_rejected_before_connecting(sockdir):
    result = CliRunner().invoke(cli, ["--socket", str(sockdir / "none.sock"), "create", "../x"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: agent name '../x'")
    with pytest.raises(AgentdError) as info:
        Client(sockdir / "none.sock").show(".hidden")
    assert info.value.code is p.ErrorCode.INVALID_NAME


def test_delete_with_json_requires_yes(sockdir):
    result = CliRunner().invoke(cli, ["--socket", str(sockdir / "none.sock"), "--json", "delete", "a"])
    assert result.exit_code == 2
    assert "--yes" in result.stderr


# --- a minimal scripted responder (a stand-in until the daemon exists) -------------------

Handler = Callable[[dict], list[dict]]


class Responder:
    """Accepts connections and answers each request frame with `handler(frame)`'s frames."""

    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self.requests: list[dict] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                try:
                    while (frame := recv_frame(conn)) is not None:
                        self.requests.append(frame)
                        for reply in self.handler(frame):
                            send_frame(conn, reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


CHAT_RESULT = {
    "text": "Hello there!",
    "cached_tokens": 120,
    "prefilled_tokens": 9,
    "generated_tokens": 3,
    "prompt_tokens": 129,
    "cache_source": "memory",
    "restore_ms": 0.0,
    "ttft_ms": 41.5,
    "decode_tokens_per_s": 88.2,
    "finish_reason": "stop",
}


def fake_daemon(frame: dict) -> list[dict]:
    rid, op = frame["id"], frame["op"]
    if op == "hello":
        return [responses.result(rid, protocol=p.PROTOCOL_VERSION, daemon_version="0.0-test", model_id="tiny", pid=1)]
    if op == "chat":
        return [responses.token(rid, "Hello"), responses.token(rid, " there"), responses.token(rid, "!"), responses.result(rid, **CHAT_RESULT)]
    if op == "show" and frame["name"] == "ghost":
        return [responses.error(rid, p.ErrorCode.NOT_FOUND, "no agent named 'ghost'")]
    if op == "list":
        return [responses.result(rid, agents=[AGENT])]
    return [responses.error(rid, p.ErrorCode.UNKNOWN_OP, op)]


@pytest.fixture
def responder(sockdir):
    r = Responder(sockdir / "d.sock", fake_daemon)
    yield r
    r.close()


def test_chat_streams_tokens_to_stdout_and_stats_to_stderr(responder):
    result = CliRunner().invoke(cli, ["--socket", str(responder.path), "chat", "alice", "hi", "--max-tokens", "5"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Hello there!\n"
    assert "3 tokens" in result.stderr and "cache memory" in result.stderr
    hello, chat = responder.requests
    assert hello["op"] == "hello" and hello["protocol"] == p.PROTOCOL_VERSION
    assert p.request_from_wire(chat)[1] == p.Chat("alice", "hi", max_tokens=5)


def test_chat_json_is_one_object_with_text(responder):
    result = CliRunner().invoke(cli, ["--socket", str(responder.path), "--json", "chat", "alice", "-"], input="hi\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == CHAT_RESULT
    assert p.request_from_wire(responder.requests[-1])[1].message == "hi"


def test_client_stream_result_and_daemon_errors(responder):
    with Client(responder.path) as client:
        assert client.hello()["model_id"] == "tiny"
        stream = client.chat("alice", "hi")
        assert list(stream) == ["Hello", " there", "!"]
        assert stream.result == CHAT_RESULT and stream.text == "Hello there!"
        with pytest.raises(AgentdError) as info:
            client.show("ghost")
        assert info.value.code is p.ErrorCode.NOT_FOUND
        # The connection survives a daemon error; an abandoned stream drops it and reconnects.
        assert client.list()["agents"] == [AGENT]
        stream = client.chat("alice", "hi")
        assert next(stream) == "Hello"
        stream.close()
        assert client.list()["agents"] == [AGENT]
    assert [r["op"] for r in responder.requests].count("hello") == 2


def test_show_error_is_one_line(responder):
    result = CliRunner().invoke(cli, ["--socket", str(responder.path), "show", "ghost"])
    assert result.exit_code == 1
    assert result.stderr == "Error: no agent named 'ghost'\n"


def test_protocol_mismatch_is_a_clear_message(sockdir):
    def old_daemon(frame: dict) -> list[dict]:
        return [responses.error(frame["id"], p.ErrorCode.PROTOCOL_MISMATCH, "daemon speaks protocol 99")]

    r = Responder(sockdir / "old.sock", old_daemon)
    try:
        result = CliRunner().invoke(cli, ["--socket", str(r.path), "ping"])
        assert result.exit_code == 1
        assert "agentctl speaks protocol 1" in result.stderr and "protocol 99" in result.stderr
    finally:
        r.close()


def test_daemon_hanging_up_is_connection_lost(sockdir):
    r = Responder(sockdir / "mute.sock", lambda frame: [])
    try:
        with pytest.raises(ConnectionLost):
            Client(r.path, timeout=0.3).ping()
    finally:
        r.close()


# --- rendering --------------------------------------------------------------------------

NOW = 1_700_000_000.0
AGENT = {
    "name": "alice",
    "role": "reviewer",
    "state": "hot",
    "tokens": 1234,
    "bytes": 25 * 1024 * 1024,
    "dirty": True,
    "messages": 6,
    "created_at": NOW - 7200,
    "updated_at": NOW - 65,
    "last_saved_at": None,
}
STATUS = {
    "pid": 4242,
    "uptime_s": 3725.0,
    "daemon_version": "0.1.0",
    "model": {"id": "SmolLM2-135M-Instruct", "path": "/m", "bytes": 270_000_000},
    "memory": {
        "model_bytes": 270_000_000,
        "cache_bytes": 25 * 1024 * 1024,
        "active_bytes": 300_000_000,
        "system_available": 8 * 1024**3,
        "system_total": 16 * 1024**3,
        "pressure": "normal",
    },
    "limits": {"max_hot": 8, "cache_budget": 2 * 1024**3, "min_available": 1024**3},
    "flush": {
        "interval_s": 30.0,
        "last_flush_at": NOW - 12,
        "last_result": "ok",
        "last_error": None,
        "consecutive_failures": 0,
    },
    "agents": [AGENT, {**AGENT, "name": "bob", "state": "cold", "dirty": False, "last_saved_at": NOW - 3600}],
}


def test_humanize():
    assert render.human_bytes(0) == "0 B"
    assert render.human_bytes(1536) == "1.5 KiB"
    assert render.human_bytes(25 * 1024 * 1024) == "25.0 MiB"
    assert render.human_bytes(None) == "-"
    assert render.human_duration(0.0123) == "12 ms"
    assert render.human_duration(0.00031) == "0.3 ms"
    assert render.human_duration(75) == "1m 15s"
    assert render.human_duration(90061) == "1d 1h"
    assert render.human_ago(None) == "never"
    assert render.human_ago(NOW - 65, now=NOW) == "1m 5s ago"


def test_render_status_and_list():
    text = render.render_status(STATUS, now=NOW)
    for expected in ["pid 4242", "up 1h 2m", "SmolLM2-135M-Instruct", "pressure normal", "2 (1 hot, 1 dirty)",
                     "alice", "bob", "25.0 MiB", "last 12.0 s ago (ok)"]:  # fmt: skip
        assert expected in text, expected
    lines = render.render_list({"agents": STATUS["agents"]}, now=NOW).splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "STATE", "TOKENS", "SIZE", "MSGS", "DIRTY", "UPDATED", "SAVED"]
    assert lines[1].split()[:4] == ["alice", "reviewer", "hot", "1234"] and lines[1].endswith("never")
    assert render.render_list({"agents": []}) == "No agents."


def test_render_tolerates_missing_fields():
    assert "daemon" in render.render_status({})
    assert render.render_show({"agent": {}, "system": "Be brief."}).endswith("system prompt:\n  Be brief.")
    assert render.render_chat_stats({}).startswith("[- tokens")
    assert render.render_history({"messages": [{"role": "user", "content": "hi"}]}) == "[user]\nhi"


def test_chat_error_frame_mid_stream(sockdir):
    def failing(frame: dict) -> list[dict]:
        if frame["op"] == "chat":
            return [responses.token(frame["id"], "par"), responses.error(frame["id"], p.ErrorCode.MODEL_ERROR, "generation failed")]
        return fake_daemon(frame)

    r = Responder(sockdir / "f.sock", failing)
    try:
        with Client(r.path) as client:
            stream = client.chat("alice", "hi")
            with pytest.raises(AgentdError) as info:
                stream.wait()
            assert info.value.code is p.ErrorCode.MODEL_ERROR and stream.text == "par"
            with pytest.raises(AgentdError):  # asking again gives the same answer
                stream.wait()
            assert client.list()["agents"] == [AGENT]  # an error frame is terminal: connection reusable
        result = CliRunner().invoke(cli, ["--socket", str(r.path), "chat", "alice", "hi"])
        assert result.exit_code == 1
        assert result.stdout == "par\n" and result.stderr == "Error: generation failed\n"
    finally:
        r.close()


def test_render_status_problems_and_unflushed():
    status = {
        **STATUS,
        "flush": {**STATUS["flush"], "last_flush_at": None, "last_result": "never"},
        "problems": [{"agent": "carol", "reason": "checksum", "message": "checksum mismatch", "moved_to": "/q/c"}],
    }
    text = render.render_status(status, now=NOW)
    assert "flush:  every 30.0 s, last never\n" in text
    assert "problem: carol: checksum mismatch (moved to /q/c)" in text
