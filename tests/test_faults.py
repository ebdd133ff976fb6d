"""Faults against the real daemon: kill -9 at random moments, a full disk, damaged files,
a lost records database, a missing model. Nothing acknowledged may be lost, no file may be
torn, and the daemon must come back (or refuse to start) with one clear line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agentctl.client import AgentdError, ClientError
from agentd.atomic import is_temp
from agentd.blocks import BlockStore
from agentd.cachefile import load_layers
from agentd.engine import Engine
from agentd.kvrows import RowLayout
from agentd.restore_arrays import RowTarget
from agentd.kvstore import KVSettings, cache_fingerprint, parse_manifest, read_tail
from daemonproc import DaemonProc

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. "
AGENTS = ("a", "b", "c")


def chat(client, name, message, max_tokens=4):
    stream = client.chat(name, message, max_tokens=max_tokens)
    pieces = list(stream)
    result = stream.wait()
    assert "".join(pieces) == result["text"]
    return result


def caches(d: DaemonProc) -> Path:
    return d.home / "data" / "caches"


def partials(d: DaemonProc) -> list[Path]:
    return [p for p in caches(d).rglob("*") if p.is_file() and is_temp(p) and "quarantine" not in p.parts]


def manifests(d: DaemonProc) -> list[Path]:
    return sorted(caches(d).glob("agents/*/manifest.json"))


def verify_store(d: DaemonProc, engine: Engine, kv: KVSettings) -> Counter:
    """Without changing anything: every block under its final name is whole, and every
    manifest is whole and names blocks, a tail and a window that verify (what a start loads)."""
    seen = Counter()
    blocks = BlockStore(caches(d) / "blocks", cache_fingerprint(engine.fingerprint, engine.dtype, kv),
                        kv.block_tokens, clean=False)
    for bid in blocks.sizes():
        blocks.verify(bid)
        seen["blocks"] += 1
        data = blocks.path(bid).read_bytes()
        n = int.from_bytes(data[-12:-8], "little")
        seen["blocks_from_tails"] += len(json.loads(data[-12 - n:-12])["segments"]) > 1  # a linked tail
    for path in manifests(d):
        m = parse_manifest(path.read_bytes(), path.parent.name)
        assert set(m["blocks"]) <= set(blocks.sizes()), "a manifest names a block that is not there"
        if m["tail"]:
            target = RowTarget(RowLayout.from_json(m["layout"]), m["n_tokens"])
            good, why = read_tail(path.parent / m["tail"]["file"], m["tail"], target, m["tail"]["start"])
            assert why is None and good == m["n_tokens"], f"a torn tail: {why}"
        if m["window"]:
            load_layers(path.parent / m["window"]["file"], {})
        seen["manifests"] += 1
    return seen


def turns(messages: list[dict]) -> list[tuple[str, str]]:
    assert len(messages) % 2 == 0
    pairs = list(zip(messages[::2], messages[1::2]))
    assert all(u["role"] == "user" and a["role"] == "assistant" for u, a in pairs)
    return [(u["content"], a["content"]) for u, a in pairs]


# ---- kill -9 ------------------------------------------------------------------------


class Load(threading.Thread):
    """One client chatting with random agents and asking for saves until the daemon dies."""

    def __init__(self, d: DaemonProc, rng: random.Random, cycle: int, acked: dict, maybe: set, first: dict):
        super().__init__(daemon=True)
        self.d, self.rng, self.cycle = d, rng, cycle
        self.acked, self.maybe, self.first = acked, maybe, first
        self.chats = self.saves = self.gcs = 0

    def run(self) -> None:
        try:
            with self.d.client(timeout=30) as c:
                i = 0
                while True:
                    name = self.rng.choice(AGENTS)
                    msg = f"cycle {self.cycle} turn {i} for {name}"
                    i += 1
                    self.maybe.add(msg)  # until its result frame arrives it may or may not be recorded
                    r = chat(c, name, msg, max_tokens=self.rng.randint(1, 6))
                    self.acked[name].append((msg, r["text"]))
                    self.maybe.discard(msg)
                    self.first.setdefault(name, r["cache_source"])
                    self.chats += 1
                    if self.rng.random() < 0.5:
                        c.save()
                        self.saves += 1
                    if self.rng.random() < 0.25:
                        # A scratch agent saved and deleted: garbage blocks for gc to collect.
                        with contextlib.suppress(AgentdError):
                            c.create("scratch", system=SYSTEM * 30 + f"Scratch {self.cycle} {i}.")
                        chat(c, "scratch", "scratch turn", max_tokens=2)
                        c.save("scratch")
                        c.delete("scratch") if self.rng.random() < 0.5 else c.gc()
                        self.gcs += 1
        except ClientError:
            return  # the daemon was killed under us


@pytest.fixture(scope="module")
def long_context_llama_dir(tmp_path_factory) -> Path:
    """The tiny llama with a 64k context: on an idle machine the kill loop's conversations grow
    past 4,096 tokens, and a refused turn (CONTEXT_TOO_LONG) would end its load early."""
    import tinymodels

    return tinymodels.make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-64k", context=1 << 16)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_acknowledged_turn_and_tears_no_file(home, long_context_llama_dir):
    tiny_llama_dir = long_context_llama_dir
    rng = random.Random(20240606)
    engine = Engine(tiny_llama_dir)
    kv = KVSettings(block_tokens=32)  # many blocks per agent: kills land in block writes and gc
    args = ("--flush-interval", "0.2", "--block-tokens", "32")
    acked: dict[str, list] = {n: [] for n in AGENTS}
    maybe: set[str] = set()
    stats = Counter()
    d = DaemonProc(home, tiny_llama_dir, *args)
    with d:
        with d.client() as c:
            for n in AGENTS:
                # Long prompts: bigger files, so more kills land inside a write.
                c.create(n, system=SYSTEM * rng.randint(20, 60) + f"You are agent {n}.")
    deadline = time.monotonic() + 150
    while stats["kills"] < 60 and time.monotonic() < deadline:
        cycle = stats["kills"]
        d = DaemonProc(home, tiny_llama_dir, *args)
        if rng.random() < 0.1:
            # Sometimes during start itself: loading the model, removing leftovers, opening the records.
            d.proc = subprocess.Popen(d.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=d.env)
            time.sleep(rng.uniform(0, 0.8))
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            stats["kills"] += 1
            stats["kills_during_start"] += 1
            continue
        d.start()
        assert partials(d) == [], "an interrupted write survived a start"
        with d.client() as c:
            status = c.status()
            assert status["problems"] == [], f"a cache file was refused after a kill: {status['problems']}"
            stats["garbage_at_start"] += status["store"]["garbage_blocks"]  # collected at start: 0
            for n in AGENTS:
                check_history(turns(c.history(n)["messages"]), acked[n], maybe)
        first: dict[str, str] = {}
        load = Load(d, random.Random(rng.random()), cycle, acked, maybe, first)
        load.start()
        time.sleep(rng.uniform(0.0, 1.0))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d.kill()
        load.join(30)
        assert not load.is_alive()
        stats["kills"] += 1
        stats["chats"] += load.chats
        stats["saves"] += load.saves
        stats["gcs"] += load.gcs
        left = partials(d)
        stats["kills_mid_write"] += bool(left)
        for src in first.values():
            assert src in ("disk", "rebuilt", "new")  # never "memory": it is a fresh process
            stats[f"source_{src}"] += 1
        seen = verify_store(d, engine, kv)  # every file under its final name verifies, whenever the kill came
        stats["blocks_verified"] += seen["blocks"]
        stats["manifests_verified"] += seen["manifests"]
        stats["blocks_from_tails"] = max(stats["blocks_from_tails"], seen["blocks_from_tails"])
    with d:
        with d.client() as c:
            assert c.status()["problems"] == []
            for n in AGENTS:
                check_history(turns(c.history(n)["messages"]), acked[n], maybe)
                assert chat(c, n, "one more")["cache_source"] in ("disk", "rebuilt")
    print(f"\nkill -9: {dict(stats)}; acknowledged turns: {sum(map(len, acked.values()))}")
    assert stats["kills"] >= 50
    assert stats["source_disk"] > 0 and stats["chats"] > 100
    assert stats["gcs"] > 10 and stats["blocks_verified"] > 100 and stats["garbage_at_start"] == 0
    assert stats["blocks_from_tails"] > 0  # kills landed in a store whose tails became blocks


def check_history(history: list[tuple[str, str]], acked: list[tuple[str, str]], maybe: set[str]) -> None:
    """Every acknowledged turn is recorded, in order, with the reply as delivered; anything
    else recorded is a turn whose result frame the kill cut off."""
    extra = [t for t in history if t not in acked]
    assert all(u in maybe for u, _ in extra), f"unexpected turns recorded: {extra}"
    assert [t for t in history if t in acked] == acked, "an acknowledged turn is missing"


def test_a_crash_between_linking_the_tail_as_a_block_and_the_manifest(home, tiny_llama_dir, tmp_path, monkeypatch):
    """A turn that crosses a block boundary makes the tail file the block (rows up to the
    boundary, a trailer, a hard link), then writes the next tail and the manifest. A crash
    in between leaves a block no manifest names, on the same file as the tail the old
    manifest names: the next start collects it and resumes the old cache exactly. A save
    that fails there in-process keeps the block intact and never appends to that tail."""
    from agentd import cacherepo
    from agentd.agents import AgentStore
    from agentd.kvstore import MANIFEST

    engine, kv = Engine(tiny_llama_dir), KVSettings(block_tokens=16)
    store = AgentStore(home, engine, kv=kv)
    store.create("a", "", SYSTEM * 2)
    chat_turn = lambda st, msg: st.chat("a", msg, max_tokens=3)  # noqa: E731  (18 tokens: crosses a boundary)
    chat_turn(store, "first")
    store.save("a")
    blocks_dir = home / "caches" / "blocks"
    crash, state = tmp_path / "crash", {"armed": True, "linked": 0}
    real = cacherepo.write_file

    def write_file(replace, path, buffers):
        if path.name == MANIFEST and state["armed"]:
            state["linked"] = sum(p.stat().st_nlink == 2 for p in blocks_dir.iterdir())
            subprocess.run(["cp", "-a", str(home), str(crash)], check=True)  # what a kill -9 here leaves
            raise OSError(errno.EIO, "the daemon dies here")
        return real(replace, path, buffers)

    monkeypatch.setattr(cacherepo, "write_file", write_file)
    old = json.loads(store.cache_path("a").read_text())
    assert old["tail"] and len(old["tail"]["segments"]) >= 1
    chat_turn(store, "crossing")
    with pytest.raises(OSError):
        store.save("a")
    assert state["linked"] == 1, "the tail file was not linked as the block before the manifest"
    linked = next(p for p in blocks_dir.iterdir() if p.stat().st_nlink == 2)
    linked_bytes = linked.read_bytes()

    # In-process: the retry names the linked block and writes a new tail; the old tail (the
    # block's file) is not appended to, and the old manifest's files are deleted after.
    state["armed"] = False
    store._hot["a"].dirty = True
    store.save("a")
    m = json.loads(store.cache_path("a").read_text())
    assert linked.name[:64] in m["blocks"] and linked.read_bytes() == linked_bytes and linked.stat().st_nlink == 1
    for bid in m["blocks"]:
        store.repo.blocks.verify(bid)

    # After the crash: the start collects the unnamed block, the old manifest loads whole.
    store.close()
    monkeypatch.setattr(cacherepo, "write_file", real)
    fresh = tmp_path / "fresh"
    shutil.copytree(crash, fresh)
    shutil.rmtree(fresh / "caches")
    crashed = AgentStore(crash, engine, kv=kv)
    assert crashed.problems == [] and crashed.repo.stats()["garbage_blocks"] == 0
    assert not (crash / "caches" / "blocks" / linked.name).exists()
    tail = crash / "caches" / "agents" / "a" / old["tail"]["file"]
    assert tail.stat().st_nlink == 1
    r = chat_turn(crashed, "crossing")
    assert r.cache_source == "disk" and r.cached_tokens == old["n_tokens"]
    assert r.text == chat_turn(AgentStore(fresh, engine, kv=kv), "crossing").text
    crashed.save("a")  # the same turn again: this time the old tail becomes that block
    m = json.loads(crashed.cache_path("a").read_text())
    assert linked.name[:64] in m["blocks"] and not tail.exists()
    for bid in m["blocks"]:
        crashed.repo.blocks.verify(bid)
    crashed.close()
    assert AgentStore(crash, engine, kv=kv).chat("a", "again", max_tokens=2).cached_tokens == m["n_tokens"]


# ---- disk full ------------------------------------------------------------------------


@pytest.fixture
def tmpfs(home):
    """A 6 MB tmpfs: a real full disk. Skips where it cannot be mounted (not root, macOS)."""
    mnt = home / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the filesystem's free space."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def wait_for(probe, timeout=10.0, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_full_disk_keeps_the_old_file_shows_the_error_backs_off_and_recovers(home, tmpfs, tiny_llama_dir):
    d = DaemonProc(tmpfs, tiny_llama_dir, "--flush-interval", "0.2")
    d.log = home / "daemon-stderr.log"  # off the full filesystem, so we can read it
    with d:
        with d.client() as c:
            c.create("a", system=SYSTEM * 40)
            chat(c, "a", "first turn")
            assert wait_for(lambda: not c.status()["agents"][0]["dirty"])
            cache = caches(d) / "agents" / "a" / "manifest.json"
            before = cache.read_bytes()
            filler = fill(tmpfs, leave=160 * 1024)  # room for the records' next commits, not for a cache file
            # A long turn: a save writes only new rows, so they must outgrow the space left.
            second = "second turn, while the disk is full. " + "More words to remember. " * 120
            acked = chat(c, "a", second)  # the turn commits; its cache cannot
            status = wait_for(lambda: (s := c.status())["flush"]["last_result"] == "failed" and s)
            assert status, "the flush never reported the full disk"
            flush = status["flush"]
            assert "No space left on device" in flush["last_error"], flush
            assert flush["consecutive_failures"] >= 1
            assert status["agents"][0]["dirty"] is True
            assert cache.read_bytes() == before, "the old file was damaged"
            assert partials(d) == [], "a temp file was left behind"
            # Backoff: 0.4 s, 0.8 s, 1.6 s ... after a 0.2 s interval, not one attempt per tick.
            time.sleep(2.5)
            failures = c.status()["flush"]["consecutive_failures"]
            assert 2 <= failures <= 4, failures
            rendered = subprocess.run(
                [os.sys.executable, "-m", "agentctl.cli", "--socket", str(d.socket), "status"],
                capture_output=True, text=True, timeout=30,
            )
            assert "No space left on device" in rendered.stdout + rendered.stderr
            assert c.ping()["pong"] and turns(c.history("a")["messages"])[-1] == (second, acked["text"])
            filler.unlink()
            status = wait_for(lambda: (s := c.status())["flush"]["last_result"] == "ok" and s, timeout=15)
            assert status and status["flush"]["consecutive_failures"] == 0 and not status["agents"][0]["dirty"]
            assert cache.read_bytes() != before
    assert "Traceback" not in d.stderr()
    with d:  # what the retry saved is what comes back
        with d.client() as c:
            assert chat(c, "a", "third")["cache_source"] == "disk"


def test_a_chat_on_a_completely_full_disk_is_an_error_and_not_recorded(home, tmpfs, tiny_llama_dir):
    d = DaemonProc(tmpfs, tiny_llama_dir, "--flush-interval", "3600")
    d.log = home / "daemon-stderr.log"
    with d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            chat(c, "a", "first")
            filler = fill(tmpfs, leave=0)
            outcomes = Counter()
            for i in range(5):
                try:
                    r = chat(c, "a", f"full {i}")
                    outcomes["acked"] += 1
                    assert (f"full {i}", r["text"]) in turns(c.history("a")["messages"])
                except ClientError as e:
                    outcomes[getattr(e, "code", type(e).__name__)] += 1
                    assert f"full {i}" not in str(c.history("a"))
                    assert "full" in str(e).lower()
            assert c.ping()["pong"]
            filler.unlink()
            chat(c, "a", "after")
            assert turns(c.history("a")["messages"])[-1][0] == "after"
    print(f"\nchats on a full disk: {dict(outcomes)}")


def test_injected_enospc_half_way_through_a_flush_backs_off_and_retries(home, tiny_llama_dir):
    """The daemon core in-process, its store writing through a writer that fails half-way."""
    import asyncio

    from agentd import protocol as p
    from agentd.atomic import atomic_replace
    from agentd.core import Daemon, Settings

    state = {"full": False, "attempts": 0}

    def writer(path, write):
        def half_then_enospc(tmp):
            state["attempts"] += 1
            write(tmp)
            if state["full"]:
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        atomic_replace(path, half_then_enospc)

    async def scenario():
        daemon = Daemon(Settings(home=home, model_dir=tiny_llama_dir, flush_interval=0.2), Engine(tiny_llama_dir))
        daemon.store._replace = writer

        async def emit(frame):
            pass

        async def call(req):
            return await daemon.handle(1, req, emit)

        await call(p.Create("a", system=SYSTEM * 10))
        await call(p.Chat("a", "one", max_tokens=4))
        assert await daemon.flush_now() == ["a"]
        path = daemon.store.cache_path("a")
        before = path.read_bytes()
        state["full"] = True
        await call(p.Chat("a", "two " * 100, max_tokens=4))  # a new tail file at least: a write that fails
        delays = []
        for expected in (1, 2, 3):
            t = time.time()
            assert await daemon.flush_now() == []
            flush = (await call(p.Status()))["flush"]
            assert flush["last_result"] == "failed" and flush["consecutive_failures"] == expected
            assert flush["last_error"] == "OSError: [Errno 28] No space left on device"
            delays.append(round(daemon.flush.next_due - t, 1))
            assert path.read_bytes() == before and [q.name for q in home.rglob(".tmp-*")] == []
        assert delays == [0.4, 0.8, 1.6]
        attempts = state["attempts"]
        await daemon.tick()  # not due yet: no attempt
        assert state["attempts"] == attempts
        assert (await call(p.Ping()))["type"] == "result"
        state["full"] = False
        daemon.flush.next_due = 0  # as if the backoff had passed
        await daemon.tick()
        flush = (await call(p.Status()))["flush"]
        assert (flush["last_result"], flush["last_error"], flush["consecutive_failures"]) == ("ok", None, 0)
        assert path.read_bytes() != before
        await daemon.final_flush()

    asyncio.run(scenario())


# ---- damaged and foreign files --------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def manifest_of(d: DaemonProc, name: str) -> Path:
    return caches(d) / "agents" / name / "manifest.json"


def first_block(d: DaemonProc, name: str) -> Path:
    m = json.loads(manifest_of(d, name).read_text())
    return caches(d) / "blocks" / (m["blocks"][0] + ".kvb")


def rewrite_manifest(path: Path, **changes) -> None:
    """A valid manifest (checksum recomputed) with some fields changed: an old version, say."""
    from agentd.kvstore import encode_manifest

    m = json.loads(path.read_text())
    m.update(changes)
    path.write_bytes(encode_manifest(m))


# damage -> the reason the daemon must give
DAMAGE = {
    "truncated": (lambda d, n: manifest_of(d, n).write_bytes(manifest_of(d, n).read_bytes()[:200]), "corrupt"),
    "block-byte": (lambda d, n: flip(first_block(d, n), 100), "checksum"),  # a row (format 2: rows first)
    "block-truncated": (lambda d, n: first_block(d, n).write_bytes(first_block(d, n).read_bytes()[:5000]),
                        "truncated"),
    "manifest-byte": (lambda d, n: flip(manifest_of(d, n), manifest_of(d, n).stat().st_size // 2), "checksum"),
    "older-format": (lambda d, n: rewrite_manifest(manifest_of(d, n), version=1), "version"),
    "empty": (lambda d, n: manifest_of(d, n).write_bytes(b""), "corrupt"),
}


def test_damaged_old_and_foreign_caches_are_refused_in_one_line_and_rebuilt(home, tiny_llama_dir, tiny_gemma_dir,
                                                                           tmp_path):
    names = [*DAMAGE, "other-model"]
    args = ("--flush-interval", "3600", "--block-tokens", "16")
    d = DaemonProc(home, tiny_llama_dir, *args)
    with d:
        with d.client() as c:
            for n in names:
                c.create(n, system=f"{n}: " + SYSTEM * 4)  # each its own blocks: damage hits one agent
                chat(c, n, "before the damage")
            assert sorted(c.save()["saved"]) == sorted(names)
    with DaemonProc(tmp_path / "gemma", tiny_gemma_dir, "--block-tokens", "16") as g:
        with g.client() as c:
            c.create("other-model", system=SYSTEM)
            chat(c, "other-model", "a gemma turn")
            c.save()
    shutil.rmtree(caches(d) / "agents" / "other-model")
    shutil.copytree(caches(g) / "agents" / "other-model", caches(d) / "agents" / "other-model")
    for n, (damage, _) in DAMAGE.items():
        damage(d, n)
    with d:
        with d.client() as c:
            for n in names:
                r = chat(c, n, "after the damage")
                assert r["cache_source"] == "rebuilt", n
                assert [u for u, _ in turns(c.history(n)["messages"])] == ["before the damage", "after the damage"]
            problems = {pr["agent"]: pr["reason"] for pr in c.status()["problems"]}
        assert problems == {**{n: reason for n, (_, reason) in DAMAGE.items()}, "other-model": "model"}
        assert len(list((caches(d) / "quarantine").iterdir())) == len(names)  # moved aside, not deleted
        assert d.stop() == 0
    log = d.stderr()
    assert "Traceback" not in log
    refused = [line for line in log.splitlines() if "cache refused" in line]
    assert len(refused) == len(names)
    with d:  # the rebuilt caches were saved on shutdown and now load cleanly
        with d.client() as c:
            assert c.status()["problems"] == []
            assert {chat(c, n, "again")["cache_source"] for n in names} == {"disk"}


def test_a_v1_cache_file_is_loaded_and_converted_by_the_daemon(home, tiny_llama_dir):
    """Today's single-file caches (format agentd-kv v1) keep working after an upgrade."""
    (home / "data" / "caches").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "data" / "legacy-v1-tiny-llama.safetensors",
                home / "data" / "caches" / "legacy.safetensors")
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600")
    with d:
        with d.client() as c:
            assert c.status()["store"]["legacy_files"] == 1
            r = chat(c, "legacy", "after the upgrade")  # its record came from the v1 file
            assert r["cache_source"] == "disk" and r["cached_tokens"] > 40
        assert d.stop() == 0  # the final flush saves it as blocks
    assert not (home / "data" / "caches" / "legacy.safetensors").exists() and manifest_of(d, "legacy").exists()
    with d:
        with d.client() as c:
            assert c.status()["store"]["legacy_files"] == 0
            assert chat(c, "legacy", "again")["cache_source"] == "disk"


def test_lost_records_database_is_recovered_from_the_caches(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600")
    with d:
        with d.client() as c:
            c.create("saved", role="Technical Specialist", system=SYSTEM)
            replies = [chat(c, "saved", m)["text"] for m in ("one", "two")]
            c.create("never-saved", system=SYSTEM)
            c.save("saved")
            chat(c, "saved", "three, after the save")  # in the records only, until the shutdown flush
            expected = turns(c.history("saved")["messages"])
            d.proc.send_signal(signal.SIGKILL)  # no final flush: turn three is not in the file
            d.proc.wait(10)
    data = d.home / "data"
    for f in data.glob("agents.db*"):
        f.unlink()
    with d:
        with d.client() as c:
            names = [a["name"] for a in c.list()["agents"]]
            assert names == ["saved"]  # never-saved had no file to come back from
            info = c.show("saved")
            assert info["agent"]["role"] == "Technical Specialist" and info["system"] == SYSTEM
            assert turns(c.history("saved")["messages"]) == expected[:2]
            assert [a for _, a in expected[:2]] == replies
            assert chat(c, "saved", "four")["cache_source"] == "disk"
    assert "recovered 4 message(s)" in d.stderr() and "Traceback" not in d.stderr()


def test_a_cache_file_without_a_usable_record_is_quarantined_not_loaded(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600")
    with d:
        with d.client() as c:
            for n in ("flipped", "renamed"):
                c.create(n, system=SYSTEM)
                chat(c, n, "hello")
            c.save()
    (d.home / "data" / "agents.db").unlink()
    flip(manifest_of(d, "flipped"), manifest_of(d, "flipped").stat().st_size // 3)
    os.rename(caches(d) / "agents" / "renamed", caches(d) / "agents" / "impostor")
    with d:
        with d.client() as c:
            assert c.list()["agents"] == []
            assert sorted(pr["agent"] for pr in c.status()["problems"]) == ["flipped", "impostor"]
            assert c.status()["store"]["blocks"] == 0  # what they named is garbage, collected
    assert manifests(d) == []
    assert "Traceback" not in d.stderr()


def test_deleting_an_agent_removes_its_file_before_its_record(home, tiny_llama_dir):
    """A crash between the two steps must not let the file's record copy resurrect the agent."""
    from agentd.agents import AgentStore

    store = AgentStore(home, Engine(tiny_llama_dir))
    store.create("gone", system=SYSTEM)
    store.chat("gone", "hello", max_tokens=4)
    assert store.save("gone")
    seen = []
    real_delete = store.records.delete

    def crash_at_the_record(name):
        seen.append(store.cache_path(name).exists())
        raise KeyboardInterrupt("the process dies here")

    store.records.delete = crash_at_the_record
    with pytest.raises(KeyboardInterrupt):
        store.delete("gone")
    assert seen == [False]
    store.records.delete = real_delete
    store.close()
    (home / "agents.db").unlink()
    assert AgentStore(home, Engine(tiny_llama_dir)).records.all() == []


def test_a_missing_or_broken_model_is_one_line_and_exit_1(home, tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_llama_dir, garbled)
    (garbled / "config.json").write_text("{nope")
    for model, words in ((tmp_path / "missing", "no model at"), (broken, "cannot load"), (garbled, "cannot load")):
        r = subprocess.run(DaemonProc(home, model).argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 78
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("agentd: ") and words in last and str(model) in last


def test_a_corrupt_records_database_refuses_to_start_in_one_line(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir)
    (d.home / "data").mkdir(parents=True)
    (d.home / "data" / "agents.db").write_bytes(os.urandom(8192))
    r = subprocess.run(d.argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "Traceback" not in r.stderr, r.stderr
    assert "agents.db" in r.stderr.strip().splitlines()[-1]


def test_a_flush_interval_below_the_tick_is_honoured(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "0.2") as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            t = time.monotonic()
            while time.monotonic() - t < 4.0:
                chat(c, "a", "keep it dirty", max_tokens=2)
                time.sleep(0.02)
        flushes = d.stderr().count("flushed 1 agent(s)")
    # A 1 s tick would give at most 4; runs of 3 s gave 6-11 flushes, too close to the bar.
    assert flushes >= 8, f"{flushes} flushes in 4 s with --flush-interval 0.2"


def test_a_turn_is_durable_before_its_result_frame_is_sent(home, tiny_llama_dir):
    """kill -9 the instant the result frame arrives: the turn is already committed, and
    committed with synchronous=FULL on a WAL database (fsynced, not just written)."""
    from agentd.records import Records

    d = DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600")
    acked = []
    for i in range(5):
        with d:
            with d.client() as c:
                if i == 0:
                    c.create("a", system=SYSTEM)
                assert turns(c.history("a")["messages"]) == acked
                r = chat(c, "a", f"turn {i}")
                d.proc.send_signal(signal.SIGKILL)
                acked.append((f"turn {i}", r["text"]))
                d.proc.wait(10)
    with d:
        with d.client() as c:
            assert turns(c.history("a")["messages"]) == acked
    db = Records(d.home / "data" / "agents.db")._db()
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
