"""The pieces of the HTTP front end that need no daemon: the divergence rule, tool-call
splitting, the records' schema upgrade and turn commit, --http parsing, the status page."""

from __future__ import annotations

import json
import sqlite3

import pytest

from agentd import protocol as p
from agentd.http_server import HttpConfigError, ensure_token, parse_address
from agentd.records import SCHEMA_VERSION, Records
from agentd.status_page import render_status_page
from agentd.toolcalls import ToolCallText
from agentd.transcripts import plan_turn

U1, A1, U2, A2 = ({"role": r, "content": c} for r, c in
                  [("user", "hi"), ("assistant", "hello"), ("user", "more"), ("assistant", "sure")])


def test_a_resent_conversation_that_extends_the_transcript_appends_only_the_new_tail():
    plan = plan_turn("S", [U1, A1], [U1, A1, U2], follow=True)
    assert (plan.keep, plan.new, plan.system, plan.diverged) == (None, [U2], None, False)
    # No system message in the request: the agent's own is kept, nothing diverges.
    assert not plan_turn("S", [U1, A1], [U1, A1, U2], follow=True, system=None).diverged


@pytest.mark.parametrize("system, messages, keep", [
    ("S", [{"role": "user", "content": "edited"}], 0),  # an edited first turn
    ("S", [U1], 1),  # dropped replies (a regenerate)
    ("S", [U1, A1, U2, {"role": "assistant", "content": "other"}, U2], 3),  # an edited reply
    ("T", [U1, A1, U2], 4),  # another system prompt
])
def test_a_diverging_conversation_is_followed_from_the_common_prefix(system, messages, keep):
    plan = plan_turn("S", [U1, A1, U2, A2], messages, follow=True, system=system)
    assert plan.diverged and plan.keep == min(keep, len(messages))
    assert plan.new == messages[plan.keep:] and plan.system == (None if system == "S" else system)


def test_a_turn_must_leave_something_to_answer():
    with pytest.raises(p.ProtocolError, match="add nothing"):
        plan_turn("", [U1, A1], [U1, A1], follow=True)
    with pytest.raises(p.ProtocolError, match="end with a user or tool"):
        plan_turn("", [], [U1, A1], follow=False)
    assert plan_turn("", [U1, A1], [U2], follow=False).new == [U2]


def test_tool_calls_are_held_back_from_the_stream_and_parsed():
    split = ToolCallText("<tool_call>", "</tool_call>", lambda text, tools: json.loads(text), None)
    shown = "".join(split.feed(piece) for piece in ["Let me ", "check.<tool", "_call>{\"name\": \"t\", ",
                                                     "\"arguments\": {\"x\": 1}}</tool_call>", " done<"])
    tail, calls = split.finish()
    assert shown + tail == "Let me check. done<" and split.text == shown + tail
    assert calls[0]["function"] == {"name": "t", "arguments": '{"x": 1}'} and calls[0]["id"].startswith("call_")


def test_records_upgrade_from_schema_1_and_commit_a_diverging_turn_with_its_branch(tmp_path):
    db = sqlite3.connect(tmp_path / "agents.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE agents (name TEXT PRIMARY KEY, role TEXT NOT NULL, system TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, last_used_at REAL NOT NULL);
        CREATE TABLE messages (agent TEXT NOT NULL REFERENCES agents(name) ON DELETE CASCADE,
            seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY (agent, seq));
        INSERT INTO agents VALUES ('a', '', 'S', 1, 1, 1);
        INSERT INTO messages VALUES ('a', 0, 'user', 'hi', 1), ('a', 1, 'assistant', 'hello', 1);
    """)
    db.commit()
    db.close()
    records = Records(tmp_path / "agents.db")
    assert records.get("a").messages == [U1, A1]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    branch = records.free_branch_name("a")
    n = records.commit_turn("a", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                                                       "tool_calls": [call]}],
                            keep=0, system="T", branch=branch, response=("resp_1", "{}"))
    assert n == 2 and branch == "a.b1" and records.free_branch_name("a") == "a.b2"
    assert records.get("a.b1").messages == [U1, A1] and records.get("a.b1").system == "S"
    assert records.get("a").system == "T" and records.get("a").messages[1]["tool_calls"] == [call]
    assert records.get_response("resp_1")["n_messages"] == 2
    records.close()
    version = sqlite3.connect(tmp_path / "agents.db").execute("SELECT value FROM meta").fetchone()[0]
    assert int(version) == SCHEMA_VERSION == 2


def test_branch_names_stay_valid_at_the_length_limit(tmp_path):
    records = Records(tmp_path / "agents.db")
    long = "x" * p.MAX_NAME_CHARS
    assert p.validate_agent_name(records.free_branch_name(long)) == "x" * 61 + ".b1"


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:8731", ("127.0.0.1", 8731)), (":0", ("127.0.0.1", 0)), ("[::1]:9000", ("::1", 9000)),
    ("localhost:80", ("localhost", 80)), ("off", None),
])
def test_http_addresses(value, expected):
    assert parse_address(value) == expected


@pytest.mark.parametrize("value", ["0.0.0.0:8731", "192.168.1.2:80", "example.com:80", "8731", "h:x"])
def test_http_addresses_refused(value):
    with pytest.raises(HttpConfigError):
        parse_address(value)
    if value.startswith(("0.", "192.")):
        assert parse_address(value, allow_remote=True)[1] > 0


def test_the_key_file_is_private_and_kept(tmp_path):
    key = ensure_token(tmp_path)
    assert len(key) >= 32 and (tmp_path / "http-token").stat().st_mode & 0o777 == 0o600
    (tmp_path / "http-token").chmod(0o644)
    assert ensure_token(tmp_path) == key and (tmp_path / "http-token").stat().st_mode & 0o777 == 0o600


def test_the_status_page_escapes_what_users_wrote():
    status = {"daemon_version": "0", "pid": 1, "uptime_s": 5, "model": {"id": "m", "bytes": 1},
              "memory": {"pressure": "normal", "cache_bytes": 0, "system_available": 1, "system_total": 2},
              "flush": {"last_result": "ok", "last_flush_at": 1.0, "last_error": None},
              "problems": [{"agent": "a", "reason": "checksum", "message": "<b>", "moved_to": "/q/a", "at": 1.0}],
              "agents": [{"name": "a", "role": "<script>x</script>", "state": "cold", "tokens": 3, "bytes": 10,
                          "messages": 2, "dirty": False, "last_saved_at": None}]}
    page = render_status_page(status, now=10.0)
    assert "<script>" not in page and "&lt;script&gt;" in page and "checksum" in page and "/q/a" in page
