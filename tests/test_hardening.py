"""Issue 16: what a careless or hostile local user broke, each against the real daemon.

Every test names the item of issue 16 it covers (security items 1-4 are in test_security.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from agentctl.client import AgentdError, Client
from agentd import framing
from agentd import protocol as p
from agentd.engine import finish_text
from agentd.server import CLOSE_TIMEOUT_S, DRAIN_TIMEOUT_S
from daemonproc import DaemonProc

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. "


def chat(client, name, message, max_tokens=4):
    stream = client.chat(name, message, max_tokens=max_tokens)
    pieces = list(stream)
    result = stream.wait()
    assert "".join(pieces) == result["text"]
    return result


def caches(d: DaemonProc) -> Path:
    return d.home / "data" / "caches"


def stored(d: DaemonProc, name: str) -> Path:
    """The agent's saved cache: its block-store manifest (blocks and tail are named inside)."""
    return caches(d) / "agents" / name / "manifest.json"


# ---- item 5: a stop with idle clients connected ---------------------------------------------


def test_issue16_item5_a_stop_with_an_idle_client_connected_flushes_and_exits_promptly(home, tiny_llama_dir):
    """issue 16 item 5: with any idle client connected, shutdown waited 60 s for it before the final
    flush, so the service manager's SIGKILL (also at 60 s) came first and the dirty cache was lost.
    Now the flush comes first and idle connections are closed after a short drain."""
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    with d.client() as c:
        c.create("a", system=SYSTEM)
        chat(c, "a", "hello")
    idle = Client(d.socket, timeout=30)
    idle.connect()  # greeted and silent, as an open `agentctl chat` session is
    half_open = socket.socket(socket.AF_UNIX)
    half_open.connect(str(d.socket))
    try:
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        # What a service manager allows before SIGKILL is 60 s; the stop must fit well inside.
        assert d.proc.wait(timeout=30) == 0
        took = time.monotonic() - t0
    finally:
        idle.close()
        half_open.close()
    assert stored(d, "a").is_file()
    assert took < 30 and DRAIN_TIMEOUT_S + CLOSE_TIMEOUT_S < 10
    log = d.stderr()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "saved 1 agent(s) on shutdown" in log


# ---- item 6: SIGHUP -------------------------------------------------------------------


def test_issue16_item6_sighup_stops_like_sigterm_flushing_and_removing_the_socket(home, tiny_llama_dir):
    """issue 16 item 6: SIGHUP (the terminal of a foreground agentd closed) killed it at once: no
    flush, no log line, a stale socket. It must stop as SIGTERM does."""
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    with d.client() as c:
        c.create("a", system=SYSTEM)
        chat(c, "a", "hello")
    assert not stored(d, "a").exists()
    assert d.stop(signal.SIGHUP) == 0
    assert stored(d, "a").is_file()
    assert not d.socket.exists()
    assert "shutting down: SIGHUP" in d.stderr()
    assert "saved 1 agent(s) on shutdown" in d.stderr()


# ---- item 8: names containing ".partial" --------------------------------------------------


def test_issue16_item8_an_agent_named_x_partial_keeps_its_cache_across_restarts_and_recovery(home, tiny_llama_dir):
    """issue 16 item 8: every start deleted the cache of an agent named `x.partial` as an interrupted
    write, `save` renamed it away, and it could not be recovered from its file."""
    names = ("x.partial", "y.partial.safetensors", "tmp-z")
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            for name in names:
                c.create(name, system=SYSTEM)
                chat(c, name, "first")
            assert sorted(c.save()["saved"]) == sorted(names)
        assert all(stored(d, n).is_file() for n in names)
        assert d.stop() == 0
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            for name in names:
                assert chat(c, name, "second")["cache_source"] == "disk", name
            assert c.save()["saved"]
        assert d.stop() == 0
    # A lost database: each agent comes back from the record copy inside its file.
    for f in (home / "data").glob("agents.db*"):
        f.unlink()
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            for name in names:
                assert [m["content"] for m in c.history(name)["messages"] if m["role"] == "user"] == [
                    "first", "second"]


# ---- item 13: a replaced socket file ------------------------------------------------------


def test_issue16_item13_a_stopping_daemon_leaves_a_socket_that_replaced_its_own(home, tiny_llama_dir):
    """issue 16 item 13: a daemon whose socket file was replaced unlinked the new owner's socket."""
    d = DaemonProc(home, tiny_llama_dir).start()
    d.socket.unlink()
    newcomer = socket.socket(socket.AF_UNIX)
    newcomer.bind(str(d.socket))
    newcomer.listen(1)
    try:
        assert d.stop() == 0
        assert d.socket.exists(), "the daemon removed a socket it did not bind"
        assert "no longer the socket this daemon bound" in d.stderr()
    finally:
        newcomer.close()


# ---- item 12: a client that half-closes after sending ---------------------------------------


def frame(obj: dict) -> bytes:
    return framing.encode_frame(obj)


def read_frames_until_terminal(sock: socket.socket) -> list[dict]:
    frames = []
    while True:
        f = framing.recv_frame(sock)
        assert f is not None, f"EOF before a terminal frame; got {frames}"
        frames.append(f)
        if f["type"] in ("result", "error"):
            return frames


def test_issue16_item12_a_half_closed_client_still_gets_its_reply_and_the_turn_is_recorded(home, tiny_llama_dir):
    """issue 16 item 12: a client that half-closes its socket after sending (`nc -N`, socat) got its
    turn cancelled: a read-side EOF is not a gone client while the write side is open."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM * 20)  # a prefill long enough for a heartbeat or two
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(str(d.socket))
        s.sendall(frame({"id": 1, "op": "hello", "protocol": 1}))
        assert framing.recv_frame(s)["type"] == "result"
        s.sendall(frame({"id": 2, "op": "chat", "name": "a", "message": "half-closed", "max_tokens": 8}))
        s.shutdown(socket.SHUT_WR)
        frames = read_frames_until_terminal(s)
        s.close()
        assert frames[-1]["type"] == "result", frames[-1]
        with d.client() as c:
            messages = c.history("a")["messages"]
        assert [m["content"] for m in messages] == ["half-closed", frames[-1]["text"]]


def test_issue16_item12_a_client_that_closes_entirely_still_cancels_its_turn(home, tiny_llama_dir):
    """issue 16 item 12, the other side: a client that is really gone still cancels the turn."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM * 20)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(d.socket))
        s.sendall(frame({"id": 1, "op": "hello", "protocol": 1}))
        assert framing.recv_frame(s)["type"] == "result"
        s.sendall(frame({"id": 2, "op": "chat", "name": "a", "message": "gone", "max_tokens": 8192}))
        framing.recv_frame(s)  # the first progress or token frame: the turn is running
        s.close()
        with d.client() as c:
            # The worker runs one turn at a time: once this one is answered, the first has ended.
            after = chat(c, "a", "after")
            messages = c.history("a")["messages"]
        assert [m["content"] for m in messages] == ["after", after["text"]]


# ---- item 7: agents.db deleted under a running daemon --------------------------------------


def test_issue16_item7_a_deleted_database_is_detected_no_turn_is_acknowledged_into_it(home, tiny_llama_dir):
    """issue 16 item 7: with agents.db deleted, the daemon kept acknowledging turns into the
    unlinked file, and after a restart they were gone. Now the write is refused, loudly; every
    turn that was acknowledged is found by the next start."""
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    with d.client() as c:
        c.create("a", system=SYSTEM)
        first = chat(c, "a", "first")
        (home / "data" / "agents.db").unlink()
        with pytest.raises(AgentdError) as err:
            chat(c, "a", "second")
        assert err.value.code == p.ErrorCode.INTERNAL and "deleted or replaced" in err.value.message
        with pytest.raises(AgentdError):
            c.create("b")
        assert c.ping()["pong"] and [a["name"] for a in c.list()["agents"]] == ["a"]
    assert d.stop() == 0
    assert d.stderr().count("was deleted or replaced while agentd was running") == 1
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            assert [m["content"] for m in c.history("a")["messages"]] == ["first", first["text"]]
            assert chat(c, "a", "third")["cache_source"] == "disk"


def test_issue16_item7_a_wal_without_its_database_is_never_replayed(home, tiny_llama_dir):
    """issue 16 item 7: a -wal left by a deleted database (the daemon killed) would be replayed
    into the new one; it is moved aside and the agents come back from their cache files."""
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600").start()
    with d.client() as c:
        c.create("a", system=SYSTEM)
        first = chat(c, "a", "first")
        c.save("a")
    (home / "data" / "agents.db").unlink()
    d.kill()
    assert (home / "data" / "agents.db-wal").exists()
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            assert [m["content"] for m in c.history("a")["messages"]] == ["first", first["text"]]
    assert "moved it aside" in d.stderr()


# ---- item 9: a FIFO at a cache path ---------------------------------------------------------


def test_issue16_item9_a_fifo_at_a_cache_path_freezes_nothing(home, tiny_llama_dir):
    """issue 16 item 9: a FIFO at a cache path blocked the event loop in open() (`list`), so ping
    timed out and SIGTERM was ignored. Only regular files are opened, never on the event loop."""
    d = DaemonProc(home, tiny_llama_dir).start()
    with d.client(timeout=15) as c:
        c.create("a", system=SYSTEM)
        os.mkfifo(caches(d) / "a.safetensors")
        assert [a["name"] for a in c.list()["agents"]] == ["a"]
        assert c.show("a")["agent"]["state"] == "cold"
        assert c.ping()["pong"]
        assert chat(c, "a", "hello")["cache_source"] == "rebuilt"  # the FIFO was refused, moved aside
        assert [pr["reason"] for pr in c.status()["problems"]] == ["unreadable"]
    assert d.stop(timeout=30) == 0


# ---- item 10: another process holding the database's write lock ----------------------------


def test_issue16_item10_a_held_write_lock_does_not_freeze_reads_or_ping(home, tiny_llama_dir):
    """issue 16 item 10: another process holding BEGIN IMMEDIATE made ping take 29 s and `list`
    fail with "database is locked". Reads take no write lock and record I/O is off the loop."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", "hello")
        holder = sqlite3.connect(home / "data" / "agents.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with d.client(timeout=10) as c:
                t0 = time.monotonic()
                assert c.ping()["pong"]
                assert [a["name"] for a in c.list()["agents"]] == ["a"]
                assert len(c.history("a")["messages"]) == 2
                assert c.show("a")["agent"]["messages"] == 2
                assert c.status()["agents"][0]["name"] == "a"
                assert time.monotonic() - t0 < 10
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with d.client() as c:
            assert chat(c, "a", "again")["cache_source"] == "memory"


# ---- item 11: the model's context length ---------------------------------------------------


def test_issue16_item11_a_prompt_beyond_the_context_is_refused_before_any_prefill(home, tiny_llama_dir):
    """issue 16 item 11: a system prompt twice the context was prefilled for minutes and answered
    garbage, and a 1 MiB message became 178,421 prompt tokens. Both get CONTEXT_TOO_LONG at once."""
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            c.create("long", system=SYSTEM * 600)
            c.create("short", system=SYSTEM)
            stream = c.chat("long", "hello", max_tokens=8)
            progress = []
            stream.on_progress = lambda done, total: progress.append(done)
            with pytest.raises(AgentdError) as err:
                stream.wait()
            assert err.value.code == p.ErrorCode.CONTEXT_TOO_LONG
            assert "context is 4096" in err.value.message and "nothing was recorded" in err.value.message
            assert progress == []
            with pytest.raises(AgentdError) as err:
                chat(c, "short", "x " * (p.MAX_TEXT_BYTES // 2))
            assert err.value.code == p.ErrorCode.CONTEXT_TOO_LONG and "agentctl reset" not in err.value.message
            assert c.history("long")["messages"] == [] and c.history("short")["messages"] == []
            assert {a["name"]: a["state"] for a in c.list()["agents"]} == {"long": "cold", "short": "cold"}
            assert chat(c, "short", "hello")["finish_reason"] in ("stop", "length")
            # A conversation that has grown too long is told how to go on.
            chat(c, "short", "y " * 2000)
            with pytest.raises(AgentdError) as err:
                chat(c, "short", "z " * 2000)
            assert "agentctl reset short" in err.value.message


def test_issue16_item11_a_cancelled_turn_leaves_no_cache_file_for_an_agent_with_no_messages(home, tiny_llama_dir):
    """issue 16 item 11: a cancelled prefill left a 271 MB cache file for an agent with no messages."""
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            c.create("a", system=SYSTEM * 200)
            stream = c.chat("a", "hello", max_tokens=8192)
            next(iter(stream))
            stream.close()  # the client goes away: the turn is cancelled
        with d.client() as c:
            assert c.save()["saved"] == []  # queued behind the cancelled turn: it has ended
            assert c.history("a")["messages"] == []
        assert not stored(d, "a").exists()
        assert d.stop() == 0
    assert not stored(d, "a").exists()


# ---- item 14: messages ---------------------------------------------------------------------


@pytest.fixture
def read_only(home):
    """Makes a directory read-only with a bind mount over itself: the daemon's open files stay
    writable, new writes there fail with EROFS, as in a home on a read-only filesystem."""
    mounted = []

    def make(path: Path) -> None:
        for argv in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot bind-mount read-only here: {r.stderr.strip()}")
            if argv[1] == "--bind":
                mounted.append(path)

    def undo() -> None:
        while mounted:
            subprocess.run(["umount", str(mounted.pop())], capture_output=True)

    make.undo = undo
    yield make
    undo()


def test_issue16_item14_reset_and_delete_in_a_read_only_home_change_nothing(home, tiny_llama_dir, read_only):
    """issue 16 item 14: reset/delete in a read-only home answered INTERNAL with a traceback, after
    the dirty cache had already been dropped. Now: a one-line error and the agent as it was."""
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", "first")
            c.save("a")
            chat(c, "a", "second")  # dirty again
            read_only(caches(d))
            for op in (c.reset, c.delete):
                with pytest.raises(AgentdError) as err:
                    op("a")
                assert "Read-only file system" in err.value.message
                agent = c.show("a")["agent"]
                assert (agent["state"], agent["dirty"], agent["messages"]) == ("hot", True, 4)
            assert "Traceback" not in d.stderr()
            read_only.undo()
            assert chat(c, "a", "third")["cache_source"] == "memory"
            c.reset("a")
            assert c.history("a")["messages"] == []


def test_issue16_item14_names_starting_with_a_dash_are_refused(home, tiny_llama_dir):
    """issue 16 item 14: names starting with '-' were accepted but unusable from agentctl."""
    with DaemonProc(home, tiny_llama_dir) as d:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(str(d.socket))
        s.sendall(frame({"id": 1, "op": "hello", "protocol": 1}))
        assert framing.recv_frame(s)["type"] == "result"
        for rid, name in enumerate(("-x", "--help"), 2):
            s.sendall(frame({"id": rid, "op": "create", "name": name}))
            reply = framing.recv_frame(s)
            assert (reply["type"], reply["code"]) == ("error", "INVALID_NAME")
            assert "must not start with '-'" in reply["message"]
        s.close()
        with d.client() as c:
            assert c.list()["agents"] == []


def test_issue16_item14_a_turn_cut_by_shutdown_says_so(home, tiny_llama_dir):
    """issue 16 item 14: a turn cancelled by shutdown said only "generation cancelled"."""
    d = DaemonProc(home, tiny_llama_dir).start()
    with d.client() as c:
        c.create("a", system=SYSTEM)
        stream = c.chat("a", "tell me everything", max_tokens=8192)
        next(iter(stream))
        d.proc.send_signal(signal.SIGTERM)
        with pytest.raises(AgentdError) as err:
            stream.wait()
    assert err.value.code == p.ErrorCode.SHUTTING_DOWN
    assert err.value.message == "agentd is shutting down; the turn was not recorded"
    assert d.proc.wait(30) == 0


def byte_level_tokenizer(folder: Path):
    """A byte-level BPE tokenizer that knows every byte, so a character outside its merges is
    several tokens (a real model's tokenizer does the same with rare characters)."""
    import json

    from mlx_lm.tokenizer_utils import load
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["plain ascii words only"] * 4, trainer=trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}))
    return load(folder)


def test_issue16_item14_a_reply_cut_inside_a_multibyte_character_has_no_replacement_character(tmp_path):
    """issue 16 item 14: a reply cut by max_tokens inside a multi-byte character was stored (and
    streamed) with U+FFFD. The incomplete character is dropped; complete ones are kept."""
    tokenizer = byte_level_tokenizer(tmp_path / "tok")
    ids = tokenizer.encode("words 😀", add_special_tokens=False)
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) == 4  # one token per byte
    detok = tokenizer.detokenizer
    for cut in range(1, 4):  # 1, 2 or 3 of the emoji's 4 bytes generated
        detok.reset()
        streamed = []
        for token in ids[: len(ids) - 4 + cut]:
            detok.add_token(token)
            if segment := detok.last_segment:
                streamed.append(segment)
        text = finish_text(detok, streamed.append)
        assert "\ufffd" not in text and text == "words " and "".join(streamed) == text
    detok.reset()
    for token in ids:
        detok.add_token(token)
    assert finish_text(detok) == "words 😀"
