"""The persistent-agent core on tiny models: exact resume, fail-closed loading, atomic saves,
eviction and accounting. No sockets here; the daemon tests drive the same code over one."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import struct

import mlx.core as mx
import pytest

from agentd import cachefile
from agentd.agents import AgentStore
from agentd.engine import Engine
from agentd.protocol import ProtocolError

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. " * 3
TURN1 = "The payment API returns a 500 error when the card token expires during checkout."
TURN2 = "What are the detailed steps to fix that API bug from our previous discussion?"


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tiny_gemma_dir):
    return {"llama": Engine(tiny_llama_dir), "gemma3": Engine(tiny_gemma_dir)}


@pytest.fixture(params=["llama", "gemma3"])
def engine(request, engines):
    return engines[request.param]


def _store(home, engine, **kw):
    return AgentStore(home, engine, **kw)


def _turn2_after_restore(home, engine, tmp_path, warm=False):
    """Turn 2 answered from memory, and from a copy of the home saved after turn 1."""
    store = _store(home, engine)
    store.create("spec", "Technical Specialist", SYSTEM)
    if warm:
        store.warm("spec")  # cache == the rendered transcript, nothing left to trim
    r1 = store.chat("spec", TURN1, max_tokens=12)
    assert store.save("spec")
    store.close()
    saved = tmp_path / "saved-home"
    shutil.copytree(home, saved)
    in_memory = store.chat("spec", TURN2, max_tokens=24)
    restored_store = _store(saved, engine)
    restored = restored_store.chat("spec", TURN2, max_tokens=24)
    return r1, in_memory, restored


def test_resumed_agent_answers_exactly_as_one_that_never_left_memory(engine, home, tmp_path):
    _, in_memory, restored = _turn2_after_restore(home, engine, tmp_path)
    if engine.model_id == "tiny-llama":
        # Every llama layer can be trimmed back, so the restored cache is always reused.
        assert (in_memory.cache_source, restored.cache_source) == ("memory", "disk")
        assert restored.cached_tokens > 0
    else:
        # A wrapped sliding window cannot be trimmed to a re-tokenized reply: both rebuild alike.
        assert in_memory.cache_source in ("memory", "rebuilt")
        assert restored.cache_source in ("disk", "rebuilt")
    assert restored.text == in_memory.text
    assert restored.generated_tokens == in_memory.generated_tokens == 24 or restored.finish_reason == "stop"
    assert (restored.cached_tokens, restored.prefilled_tokens) == (in_memory.cached_tokens, in_memory.prefilled_tokens)


def test_restore_from_disk_reuses_the_cache_even_past_a_wrapped_sliding_window(engines, home, tmp_path):
    # Warming first makes the cache hold exactly the transcript, so turn 2 needs no trim and
    # the Gemma sliding-window layers (window 16) have long wrapped when they are restored.
    engine = engines["gemma3"]
    _, in_memory, restored = _turn2_after_restore(home, engine, tmp_path, warm=True)
    assert restored.cache_source == "disk"
    assert restored.cached_tokens > 16
    assert restored.text == in_memory.text


def test_saved_file_holds_only_used_tokens_and_round_trips_bit_identical(engine, home):
    store = _store(home, engine)
    store.create("a", "", SYSTEM)
    store.chat("a", TURN1, max_tokens=8)
    agent = store._hot["a"]
    store.save("a")
    loaded = cachefile.load_cache(store.cache_path("a"), store.expect)
    assert loaded.tokens == agent.tokens
    meta = cachefile.read_header(store.cache_path("a"))
    assert int(meta["agentd.n_tokens"]) == len(agent.tokens)
    for live, back in zip(agent.cache, loaded.cache):
        assert type(live) is type(back)
        k_live, v_live = live.state[0], live.state[1]
        k_back, v_back = back.state[0], back.state[1]
        n = min(live.offset, k_live.shape[2]) if type(live).__name__ == "KVCache" else k_back.shape[2]
        assert k_back.shape[2] == n  # trimmed: no preallocated rows on disk
        assert mx.array_equal(k_live[..., :n, :], k_back).item()
        assert mx.array_equal(v_live[..., :n, :], v_back).item()
        assert back.offset == live.offset


def _saved(engine, home):
    store = _store(home, engine)
    store.create("a", "role", SYSTEM)
    store.chat("a", TURN1, max_tokens=8)
    store.save("a")
    path = store.cache_path("a")
    store.close()
    return path


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _header_len(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "truncated-header": lambda p: p.write_bytes(p.read_bytes()[:20]),
    "tensor-byte-flipped": lambda p: _flip(p, len(p.read_bytes()) - 5),
    "header-byte-flipped": lambda p: _flip(p, 8 + _header_len(p) // 2),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_corrupt_cache_is_refused_moved_aside_and_the_agent_rebuilt(engines, home, damage):
    engine = engines["llama"]
    path = _saved(engine, home)
    CORRUPTIONS[damage](path)
    with pytest.raises(cachefile.CacheFileError):
        cachefile.load_cache(path, AgentStore(home, engine).expect)
    store = _store(home, engine)
    result = store.chat("a", TURN2, max_tokens=6)
    assert result.cache_source == "rebuilt"
    assert result.cached_tokens == 0
    assert not path.exists() or store.is_hot("a")  # moved aside before the new save
    quarantined = list((home / "caches" / "quarantine").iterdir())
    assert len(quarantined) == 1
    assert store.problems and store.problems[0].agent == "a"
    history = store.records.get("a").messages
    assert [m["content"] for m in history if m["role"] == "user"] == [TURN1, TURN2]


def test_rebuilt_agent_answers_as_a_fresh_agent_with_the_same_transcript(engines, home, tmp_path):
    engine = engines["llama"]
    path = _saved(engine, home)
    _flip(path, len(path.read_bytes()) - 5)
    fresh_home = tmp_path / "fresh"
    shutil.copytree(home, fresh_home)
    (fresh_home / "caches" / "a.safetensors").unlink()
    rebuilt = _store(home, engine).chat("a", TURN2, max_tokens=10)
    from_transcript = _store(fresh_home, engine).chat("a", TURN2, max_tokens=10)
    assert rebuilt.cache_source == from_transcript.cache_source == "rebuilt"
    assert rebuilt.text == from_transcript.text


def _rewrite_meta(path, **changes):
    tensors, meta = mx.load(str(path), return_metadata=True)
    meta.update(changes)
    meta["agentd.checksum"] = cachefile._digest(meta, tensors)
    mx.save_safetensors(str(path), tensors, meta)


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("agentd.format_version", "0", "version"),
        ("agentd.model", "0123456789abcdef", "model"),
        ("agentd.tokenizer", "0123456789abcdef", "tokenizer"),
        ("agentd.dtype", "float16", "dtype"),
    ],
)
def test_foreign_or_old_cache_is_refused_with_its_reason(engines, home, field, value, reason):
    engine = engines["llama"]
    path = _saved(engine, home)
    _rewrite_meta(path, **{field: value})
    with pytest.raises(cachefile.CacheFileError) as err:
        cachefile.load_cache(path, AgentStore(home, engine).expect)
    assert err.value.reason == reason
    store = _store(home, engine)
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "rebuilt"
    assert store.problems[0].reason == reason


def test_cache_from_another_model_is_detected_by_fingerprint(tiny_llama_dir, home, tmp_path):
    import tinymodels

    other = Engine(tinymodels.make_tiny_llama(tmp_path / "other", seed=1))
    assert other.fingerprint != Engine(tiny_llama_dir).fingerprint
    path = _saved(Engine(tiny_llama_dir), home)
    with pytest.raises(cachefile.CacheFileError) as err:
        cachefile.load_cache(path, AgentStore(home, other).expect)
    assert err.value.reason == "model"


def test_changed_chat_template_is_detected(tiny_llama_dir, home, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("assistant", "bot")
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Engine(copy).tokenizer_fingerprint != Engine(tiny_llama_dir).tokenizer_fingerprint


def test_failed_write_leaves_the_old_file_intact_and_no_temp_behind(engines, home):
    engine = engines["llama"]
    path = _saved(engine, home)
    before = path.read_bytes()

    def disk_full(path_, write):
        def half_then_enospc(tmp):
            tmp.write_bytes(before[: len(before) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        from agentd.atomic import atomic_replace

        atomic_replace(path_, half_then_enospc)

    store = _store(home, engine, replace=disk_full)
    store.chat("a", TURN2, max_tokens=4)
    with pytest.raises(OSError) as err:
        store.save("a")
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["a.safetensors"]
    assert store.snapshot()["a"]["dirty"]  # still dirty: a later flush retries


def test_leftover_temp_file_is_never_loaded_and_is_removed(engines, home):
    engine = engines["llama"]
    path = _saved(engine, home)
    partial = path.with_name(".tmp-0123456789ab-a.safetensors")
    partial.write_bytes(b"half a file")
    path.unlink()
    store = _store(home, engine)
    assert not partial.exists()
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "rebuilt"


def test_evict_saves_a_dirty_agent_frees_memory_and_it_comes_back_from_disk(engines, home):
    engine = engines["llama"]
    store = _store(home, engine)
    for name in ("a", "b", "c"):
        store.create(name, "", SYSTEM * 4)
        store.chat(name, TURN1, max_tokens=4)
    assert store.lru() == ["a", "b", "c"]
    store.chat("a", TURN2, max_tokens=4)
    assert store.lru() == ["b", "c", "a"]
    per_agent = store.snapshot()
    assert all(v["bytes"] > 0 for v in per_agent.values())
    assert store.hot_bytes() == sum(v["bytes"] for v in per_agent.values())
    mx.clear_cache()
    active_before = mx.get_active_memory()
    assert store.evict("b") is True
    assert mx.get_active_memory() < active_before
    assert store.lru() == ["c", "a"]
    assert store.cache_path("b").exists()
    assert store.chat("b", TURN2, max_tokens=4).cache_source == "disk"


def test_agent_names_are_validated(engines, home):
    store = _store(home, engines["llama"])
    for bad in ["../x", "", "a/b", "x" * 65, "a\0b", ".hidden"]:
        with pytest.raises(ProtocolError):
            store.create(bad)
    store.create("Good-name_1.v2")


def test_reset_forgets_the_conversation_and_its_cache_but_keeps_the_system_prompt(engines, home):
    store = _store(home, engines["llama"])
    store.create("a", "role", SYSTEM)
    store.chat("a", TURN1, max_tokens=4)
    store.save("a")
    store.reset("a")
    rec = store.records.get("a")
    assert rec.messages == [] and rec.system == SYSTEM
    assert not store.cache_path("a").exists() and not store.is_hot("a")
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "new"


def test_turn_is_recorded_even_if_the_cache_was_never_saved(engines, home):
    store = _store(home, engines["llama"])
    store.create("a", "", SYSTEM)
    r = store.chat("a", TURN1, max_tokens=6)
    db = sqlite3.connect(home / "agents.db")
    rows = db.execute("SELECT role, content FROM messages ORDER BY seq").fetchall()
    assert rows == [("user", TURN1), ("assistant", r.text)]


def test_names_differing_only_in_case_are_refused(engines, home):
    # They would share one cache file on macOS's case-insensitive filesystem.
    from agentd.records import AlreadyExists

    store = _store(home, engines["llama"])
    store.create("Spec")
    with pytest.raises(AlreadyExists):
        store.create("spec")
    with pytest.raises(AlreadyExists):
        store.fork("Spec", "SPEC")
