"""The persistent-agent core on tiny models: exact resume, fail-closed loading, atomic saves,
eviction and accounting. No sockets here; the daemon tests drive the same code over one."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3

import mlx.core as mx
import pytest

from agentd.agents import AgentStore
from agentd.engine import Engine
from agentd.kvstore import KVSettings
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


SMALL = KVSettings(block_tokens=16)  # several blocks and a tail even on short tiny-model prompts


def test_saved_cache_holds_only_used_tokens_and_round_trips_bit_identical(engine, home):
    store = _store(home, engine, kv=SMALL)
    store.create("a", "", SYSTEM)
    store.chat("a", TURN1, max_tokens=8)
    agent = store._hot["a"]
    assert store.save("a")
    manifest = json.loads(store.cache_path("a").read_text())
    assert manifest["n_tokens"] == len(agent.tokens) == len(manifest["tokens"])
    if engine.model_id == "tiny-llama":
        assert len(manifest["blocks"]) == len(agent.tokens) // 16 > 2
        assert manifest["tail"]["start"] == 16 * len(manifest["blocks"])
    loaded = _store(home, engine, kv=SMALL).repo.load("a")
    assert loaded.tokens == agent.tokens
    for live, back in zip(agent.cache, loaded.cache):
        assert type(live) is type(back)
        assert back.offset == live.offset
        if type(live).__name__ == "KVCache":
            n = live.offset  # rows past it are mlx-lm's preallocated room, not state
            for a, b in zip(live.state[:2], back.state[:2]):
                assert mx.array_equal(a[..., :n, :], b[..., :n, :]).item()
        else:  # a sliding window: verbatim, ring position included
            assert back._idx == live._idx
            for a, b in zip(live.state[:2], back.state[:2]):
                assert mx.array_equal(a, b).item()


def _saved(engine, home, kv=SMALL):
    store = _store(home, engine, kv=kv)
    store.create("a", "role", SYSTEM)
    store.chat("a", TURN1, max_tokens=8)
    store.save("a")
    manifest = json.loads(store.cache_path("a").read_text())
    store.close()
    return home / "caches", manifest


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _block(caches, manifest, i):
    return caches / "blocks" / (manifest["blocks"][i] + ".kvb")


def _tail(caches, manifest):
    return caches / "agents" / "a" / manifest["tail"]["file"]


# damage -> (what it hits, tokens still usable from disk given the manifest)
CORRUPTIONS = {
    "block-byte-flipped": (lambda c, m: _flip(_block(c, m, 2), _block(c, m, 2).stat().st_size - 5), lambda m: 32),
    "block-truncated": (lambda c, m: _block(c, m, 1).write_bytes(_block(c, m, 1).read_bytes()[:5000]), lambda m: 16),
    "block-header-flipped": (lambda c, m: _flip(_block(c, m, 0), 40), lambda m: 0),
    "block-missing": (lambda c, m: _block(c, m, 3).unlink(), lambda m: 48),
    "tail-byte-flipped": (lambda c, m: _flip(_tail(c, m), 3), lambda m: m["tail"]["start"]),
    "tail-truncated": (lambda c, m: _tail(c, m).write_bytes(b""), lambda m: m["tail"]["start"]),
    "manifest-byte-flipped": (lambda c, m: _flip(c / "agents" / "a" / "manifest.json", 100), lambda m: 0),
    "manifest-empty": (lambda c, m: (c / "agents" / "a" / "manifest.json").write_bytes(b""), lambda m: 0),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_damage_is_refused_and_only_the_affected_suffix_is_prefilled_again(engines, home, tmp_path, damage):
    engine = engines["llama"]
    caches, manifest = _saved(engine, home)
    fresh = tmp_path / "fresh"
    shutil.copytree(home, fresh)
    shutil.rmtree(fresh / "caches")
    hit, usable = CORRUPTIONS[damage]
    hit(caches, manifest)
    store = _store(home, engine, kv=SMALL)
    result = store.chat("a", TURN2, max_tokens=10)
    from_transcript = _store(fresh, engine, kv=SMALL).chat("a", TURN2, max_tokens=10)
    assert result.cached_tokens == usable(manifest)  # the intact blocks before the damage are used
    assert result.cache_source == ("disk" if usable(manifest) else "rebuilt")
    assert result.text == from_transcript.text  # and the answer is the one a rebuild gives
    assert store.problems and store.problems[0].agent == "a"
    if damage != "block-missing" and not damage.startswith("tail"):
        assert list((caches / "quarantine").iterdir()), "the refused file was not moved aside"
    history = store.records.get("a").messages
    assert [m["content"] for m in history if m["role"] == "user"] == [TURN1, TURN2]
    assert store.save("a")  # the next save stores the damaged part again
    assert _store(home, engine, kv=SMALL).chat("a", "again", max_tokens=2).cached_tokens > usable(manifest)


def _rewrite_manifest(caches, **changes):
    from agentd.kvstore import encode_manifest

    path = caches / "agents" / "a" / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_bytes(encode_manifest(m))


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("model", "0123456789abcdef", "model"),
        ("tokenizer", "0123456789abcdef", "tokenizer"),
        ("dtype", "float16", "dtype"),
        ("kv", {"bits": 8, "group_size": 64, "block_tokens": 16}, "kv-bits"),
    ],
)
def test_foreign_cache_is_refused_with_its_reason(engines, home, field, value, reason):
    engine = engines["llama"]
    caches, _ = _saved(engine, home)
    _rewrite_manifest(caches, **{field: value})
    store = _store(home, engine, kv=SMALL)
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "rebuilt"
    assert store.problems[0].reason == reason


def test_cache_from_another_model_or_kv_setting_is_never_loaded(tiny_llama_dir, home, tmp_path):
    import tinymodels

    other = Engine(tinymodels.make_tiny_llama(tmp_path / "other", seed=1))
    assert other.fingerprint != Engine(tiny_llama_dir).fingerprint
    _saved(Engine(tiny_llama_dir), home)
    store = _store(home, other, kv=SMALL)
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "rebuilt"
    assert store.problems[0].reason == "model"
    # Blocks of other settings have other ids: a same-model store with other KV settings
    # finds no shared prefix in them.
    assert _store(home, Engine(tiny_llama_dir), kv=KVSettings(block_tokens=32)).repo.stored_prefix(
        Engine(tiny_llama_dir).render(SYSTEM, [])) == 0


def test_changed_chat_template_is_detected(tiny_llama_dir, home, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("assistant", "bot")
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Engine(copy).tokenizer_fingerprint != Engine(tiny_llama_dir).tokenizer_fingerprint


def test_failed_write_leaves_the_old_cache_intact_and_no_temp_behind(engines, home):
    engine = engines["llama"]
    caches, manifest = _saved(engine, home)
    files = lambda: {p: p.read_bytes() for p in caches.rglob("*") if p.is_file()}  # noqa: E731
    before = files()

    def disk_full(path_, write):
        def half_then_enospc(tmp):
            write(tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        from agentd.atomic import atomic_replace

        atomic_replace(path_, half_then_enospc)

    store = _store(home, engine, replace=disk_full, kv=SMALL)
    store.chat("a", TURN2 * 3, max_tokens=4)  # long enough to need new blocks
    with pytest.raises(OSError) as err:
        store.save("a")
    assert err.value.errno == errno.ENOSPC
    assert files() == before  # old manifest, blocks and tail untouched; no temp file left
    assert store.snapshot()["a"]["dirty"]  # still dirty: a later flush retries
    assert _store(home, engine, kv=SMALL).repo.load("a").tokens == manifest["tokens"]


def test_leftover_temp_files_are_never_loaded_and_are_removed(engines, home):
    engine = engines["llama"]
    caches, manifest = _saved(engine, home)
    from agentd.atomic import temp_path

    leftovers = [temp_path(caches / "agents" / "a" / "manifest.json"),
                 temp_path(_block(caches, manifest, 0).with_name("f" * 64 + ".kvb")),
                 temp_path(caches / "a.safetensors")]
    for p in leftovers:
        p.write_bytes(b"half a file")
    store = _store(home, engine, kv=SMALL)
    assert not any(p.exists() for p in leftovers)
    assert store.chat("a", TURN2, max_tokens=4).cache_source == "disk"


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
    assert store.cache_path("b").exists()  # its manifest
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
