"""The block store on tiny models: what a save writes, what agents share, what a fork and a
v1 file become, what gc removes, and exact resume across restarts with 16-token blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agentd.agents import AgentStore
from agentd.blocks import ROOT, block_id, chain_ids
from agentd.engine import Engine
from agentd.kvrows import layout_of
from agentd.kvstore import KVSettings

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. " * 4
TURN1 = "The payment API returns a 500 error when the card token expires during checkout."
TURN2 = "What are the detailed steps to fix that API bug from our previous discussion?"
SMALL = KVSettings(block_tokens=16)
FIXTURE = Path(__file__).parent / "data" / "legacy-v1-tiny-llama.safetensors"
# A store written before blocks carried their header as a trailer (format 1: header first),
# by commit fe7635a for tinymodels.make_tiny_llama(seed=0) with 16-token blocks: agent
# "old", 57 tokens, 3 blocks and a 9-row tail.
FORMAT1_STORE = Path(__file__).parent / "data" / "blocks-format1-tiny-llama"


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return Engine(tiny_llama_dir)


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return Engine(tiny_gemma_dir)


def blocks_on_disk(home: Path) -> set[str]:
    return {p.name[:64] for p in (home / "caches" / "blocks").glob("*.kvb")}


def trailer(path: Path) -> dict:
    """A format-2 block's header: JSON before its u32 length and the magic, at the end."""
    data = path.read_bytes()
    assert data[-8:] == b"AGKVBLK\x02"
    n = int.from_bytes(data[-12:-8], "little")
    return json.loads(data[-12 - n:-12])


def test_block_ids_are_a_hash_chain_over_the_fingerprint_and_tokens():
    tokens = list(range(40))
    ids = chain_ids("fp", tokens, 16)
    assert len(ids) == 2  # the partial third block has no id
    assert ids[0] == block_id("fp", ROOT, tokens[:16]) and ids[1] == block_id("fp", ids[0], tokens[16:32])
    assert chain_ids("fp", tokens[:16] + [99] * 16, 16)[0] == ids[0]  # same prefix, same first block
    assert chain_ids("fp", [99] + tokens[1:], 16)[1] != ids[1]  # a change anywhere before renames every later block
    assert chain_ids("fp-8bit", tokens, 16)[0] != ids[0]


def test_a_save_after_a_short_turn_writes_the_new_rows_and_a_manifest_not_the_cache(llama, home):
    store = AgentStore(home, llama, kv=SMALL)
    store.create("a", "", SYSTEM * 3)
    store.chat("a", TURN1, max_tokens=6)
    store.save("a")
    first = store.repo.last_save.bytes_written
    row_bytes = layout_of(store._hot["a"].cache).row_bytes()
    assert first > len(store._hot["a"].tokens) // 16 * 16 * row_bytes  # the first save wrote all its blocks
    crossed = 0
    for turn in range(4):  # 18 new tokens a turn: most turns cross a 16-token boundary
        before = len(store._hot["a"].tokens)
        prev = json.loads(store.cache_path("a").read_text())
        tail_file, had = (prev["tail"] or {}).get("file"), len(prev["blocks"])
        store.chat("a", f"ok {turn}", max_tokens=3)
        new_tokens = len(store._hot["a"].tokens) - before
        store.save("a")
        report = store.repo.last_save
        manifest_bytes = store.cache_path("a").stat().st_size
        # Each new row once (the tail that reached a boundary became the block), a block
        # trailer and a manifest: never a block's rows written again.
        assert report.bytes_written <= new_tokens * row_bytes + 4096 + manifest_bytes
        m = json.loads(store.cache_path("a").read_text())
        if report.blocks_written:
            crossed += 1
            block = home / "caches" / "blocks" / (m["blocks"][had] + ".kvb")
            # Made from the tail: its earlier segments, the rows up to the boundary, a trailer
            # (a second boundary in the same turn is a block written from memory, one segment).
            assert tail_file is None or len(trailer(block)["segments"]) >= 2
            assert (m["tail"] or {}).get("file") != tail_file
            assert tail_file is None or not (store.repo.agent_dir("a") / tail_file).exists()
        else:  # the tail was appended to, not rewritten
            assert m["tail"]["file"] == tail_file and len(m["tail"]["segments"]) >= 2
    assert crossed >= 2
    for bid in blocks_on_disk(home):
        store.repo.blocks.verify(bid)
    # A block made of several segments reads alike into one buffer per array and head and
    # into one buffer for all (the staged CUDA restore reads so).
    import numpy as np
    from agentd.kvrows import RowLayout, row_buffers

    blocks = store.repo.blocks
    bid = next(b for b in m["blocks"] if len(trailer(blocks.path(b))["segments"]) >= 2)
    i = m["blocks"].index(bid)
    parent, toks = ROOT if i == 0 else m["blocks"][i - 1], m["tokens"][i * 16:(i + 1) * 16]
    layout = RowLayout.from_json(m["layout"])
    views = [np.zeros((1, s.heads, 16, s.width), dtype=np.float32) for s in layout.arrays]
    blocks.read_into(bid, parent, toks, layout, row_buffers(views, 0, 16))
    flat = bytearray(16 * row_bytes)
    blocks.read_into(bid, parent, toks, layout, [memoryview(flat)])
    assert bytes(flat) == b"".join(bytes(b) for b in row_buffers(views, 0, 16)) and any(flat)


def test_agents_with_one_system_prompt_store_it_once_and_prefill_only_their_own_suffix(llama, home, tmp_path):
    store = AgentStore(home, llama, kv=SMALL)
    prefilled, results = [], []
    for i in range(4):
        store.create(f"a{i}", "", SYSTEM * 3)
        r = store.chat(f"a{i}", f"{TURN1} Agent {i}.", max_tokens=4)
        store.save(f"a{i}")
        prefilled.append(r.prefilled_tokens)
        results.append(r)
    system_tokens = len(llama.render(SYSTEM * 3, []))
    assert prefilled[0] == results[0].prompt_tokens
    for r in results[1:]:
        assert r.cache_source == "disk" and r.cached_tokens >= system_tokens - 16
        assert r.prefilled_tokens < r.prompt_tokens - system_tokens + 16
    stats = store.repo.stats()
    assert stats["shared_blocks"] >= system_tokens // 16 - 1 and stats["garbage_blocks"] == 0
    # Shared blocks are stored once: far less than four copies.
    one = store.repo.info("a0").bytes
    assert stats["block_bytes"] + stats["agent_bytes"] < 2 * one
    # Sharing changes no answer: a fresh store without the blocks answers alike.
    fresh = AgentStore(tmp_path / "fresh", llama, kv=SMALL)
    fresh.create("x", "", SYSTEM * 3)
    assert fresh.chat("x", f"{TURN1} Agent 3.", max_tokens=4).text == results[3].text


def test_a_fork_starts_from_the_sources_blocks_and_answers_as_the_source_would(llama, home):
    store = AgentStore(home, llama, kv=SMALL)
    store.create("src", "", SYSTEM)
    store.chat("src", TURN1, max_tokens=8)
    store.fork("src", "copy")
    forked = store.chat("copy", TURN2, max_tokens=8)
    original = store.chat("src", TURN2, max_tokens=8)
    assert forked.cache_source == "disk" and forked.cached_tokens == original.cached_tokens
    assert forked.text == original.text
    assert set(json.loads(store.cache_path("copy").read_text())["blocks"]) <= blocks_on_disk(home)


def test_delete_and_gc_remove_only_blocks_no_agent_names(llama, home):
    store = AgentStore(home, llama, kv=SMALL)
    for name, extra in (("keep", ""), ("gone", " Another prompt entirely, with words of its own.")):
        store.create(name, "", SYSTEM + extra * 6 if extra else SYSTEM)
        store.chat(name, TURN1, max_tokens=4)
        store.save(name)
    keep_blocks = set(json.loads(store.cache_path("keep").read_text())["blocks"])
    gone_blocks = set(json.loads(store.cache_path("gone").read_text())["blocks"])
    assert gone_blocks - keep_blocks and keep_blocks & gone_blocks
    store.delete("gone")
    assert blocks_on_disk(home) == keep_blocks
    assert not (home / "caches" / "agents" / "gone").exists()
    # A block no manifest names (a save a crash cut short before its manifest) is garbage.
    orphan = home / "caches" / "blocks" / ("e" * 64 + ".kvb")
    shutil.copy(home / "caches" / "blocks" / (sorted(keep_blocks)[0] + ".kvb"), orphan)
    store.repo.blocks.rescan()
    store.repo._refresh()
    assert store.repo.stats()["garbage_blocks"] == 1
    assert store.gc()["removed_blocks"] == 1 and not orphan.exists()
    shutil.copy(home / "caches" / "blocks" / (sorted(keep_blocks)[0] + ".kvb"), orphan)
    store.close()
    AgentStore(home, llama, kv=SMALL)  # and at start
    assert not orphan.exists() and blocks_on_disk(home) == keep_blocks


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_exact_resume_across_restarts_with_blocks_tail_and_window(model, llama, gemma, home, tmp_path):
    engine = llama if model == "llama" else gemma
    store = AgentStore(home, engine, kv=SMALL)
    store.create("a", "", SYSTEM)
    store.warm("a")  # the cache is the transcript: no trim needed, Gemma's windows wrap (16)
    store.chat("a", TURN1, max_tokens=10)
    for turn in range(2):
        store.warm("a")  # a re-tokenized reply would need a trim a wrapped window cannot take
        store.save("a")
        store.close()
        saved = tmp_path / f"saved-{turn}"
        shutil.copytree(home, saved)
        in_memory = store.chat("a", f"{TURN2} ({turn})", max_tokens=12)
        restored_store = AgentStore(saved, engine, kv=SMALL)
        restored = restored_store.chat("a", f"{TURN2} ({turn})", max_tokens=12)
        assert restored.cache_source == "disk" and restored.cached_tokens > 16
        assert restored.text == in_memory.text
        assert (restored.cached_tokens, restored.prefilled_tokens) == (in_memory.cached_tokens,
                                                                        in_memory.prefilled_tokens)
    m = json.loads(store.cache_path("a").read_text())
    assert (m["window"] is not None) == (model == "gemma")
    if model == "gemma":  # sliding windows are per agent: nothing of Gemma's is shared
        assert not store.repo.shareable and store.repo.stored_prefix(m["tokens"]) == 0


def test_a_v1_file_loads_and_is_converted_to_blocks(llama, home):
    # The fixture was written by agentd-kv v1 for tinymodels.make_tiny_llama(seed=0), which
    # the session fixture recreates bit for bit (same fingerprint).
    caches = home / "caches"
    caches.mkdir(parents=True)
    shutil.copy(FIXTURE, caches / "legacy.safetensors")
    store = AgentStore(home, llama)  # no agents.db: the record comes back from the v1 file
    rec = store.records.get("legacy")
    assert rec.role == "Technical Specialist" and len(rec.messages) == 2
    assert store.repo.stats()["legacy_files"] == 1
    r = store.chat("legacy", TURN2, max_tokens=4)
    assert r.cache_source == "disk" and r.cached_tokens >= 45
    store.evict("legacy")
    assert not (caches / "legacy.safetensors").exists()  # converted: the manifest took over
    assert store.repo.stats()["legacy_files"] == 0
    again = AgentStore(home, llama).chat("legacy", "and now?", max_tokens=2)
    assert again.cache_source == "disk" and again.cached_tokens > r.cached_tokens


def test_blocks_of_format_1_still_load_and_are_kept_as_they_are(llama, home, tmp_path):
    shutil.copytree(FORMAT1_STORE, home / "caches")
    old = {p.name: p.read_bytes() for p in (home / "caches" / "blocks").iterdir()}
    assert all(data.startswith(b"AGKVBLK\x01") for data in old.values())
    store = AgentStore(home, llama, kv=SMALL)  # no agents.db: the record comes back from the manifest
    store.close()
    fresh = tmp_path / "fresh"
    shutil.copytree(home, fresh)
    shutil.rmtree(fresh / "caches")
    store = AgentStore(home, llama, kv=SMALL)
    for bid in old:
        store.repo.blocks.verify(bid[:64])
    r = store.chat("old", TURN2, max_tokens=8)
    assert r.cache_source == "disk" and r.cached_tokens == 57 and not store.problems
    assert r.text == AgentStore(fresh, llama, kv=SMALL).chat("old", TURN2, max_tokens=8).text
    store.save("old")  # crossed boundaries: new blocks in format 2, the old ones untouched
    m = json.loads(store.cache_path("old").read_text())
    assert len(m["blocks"]) > 3
    for bid in m["blocks"][3:]:
        assert trailer(home / "caches" / "blocks" / (bid + ".kvb"))["id"] == bid
    assert {p.name: p.read_bytes() for p in (home / "caches" / "blocks").iterdir() if p.name in old} == old
    store.close()
    again = AgentStore(home, llama, kv=SMALL).chat("old", "and now?", max_tokens=2)
    assert again.cache_source == "disk" and again.cached_tokens > 57


def test_kv_bits_store_quantized_blocks_that_other_settings_never_load(tmp_path, home):
    import tinymodels

    model = tinymodels.make_tiny_llama(tmp_path / "hd32", head_dim=32)  # mlx quantizes groups of 32+
    plain, q8 = Engine(model), Engine(model, kv_bits=8, kv_group_size=32)
    kv8 = KVSettings(8, 32, 16)
    store = AgentStore(home, q8, kv=kv8)
    store.create("a", "", SYSTEM)
    first = store.chat("a", TURN1, max_tokens=6)
    store.save("a")
    assert type(store._hot["a"].cache[0]).__name__ == "QuantizedKVCache"
    restored = AgentStore(home, q8, kv=kv8).chat("a", TURN2, max_tokens=6)
    assert restored.cache_source == "disk" and restored.text == store.chat("a", TURN2, max_tokens=6).text
    other = AgentStore(home, plain, kv=SMALL)
    assert other.chat("a", "hi", max_tokens=2).cache_source == "rebuilt"
    assert other.problems[0].reason == "kv-bits"
    assert first.text


def test_where_arrays_cannot_be_filled_in_place_a_restore_stages_on_the_host(llama, home, monkeypatch):
    """A discrete GPU's arrays are not host memory: reads go to host arrays, uploaded once."""
    from agentd import restore_arrays

    store = AgentStore(home, llama, kv=SMALL)
    store.create("a", "", SYSTEM)
    store.chat("a", TURN1, max_tokens=6)
    store.save("a")
    expected = store.chat("a", TURN2, max_tokens=8).text

    def not_exportable(a):
        raise TypeError("not host memory")

    monkeypatch.setattr(restore_arrays, "_shared_view", not_exportable)
    restored = AgentStore(home, llama, kv=SMALL).chat("a", TURN2, max_tokens=8)
    assert restored.cache_source == "disk" and restored.cached_tokens > 32
    assert restored.text == expected


@pytest.mark.parametrize("native", [True, False], ids=["read-in-C", "read-in-Python"])
@pytest.mark.parametrize("damage", ["block-last-layer", "tail-byte", "tail-truncated"])
def test_a_restore_keeps_only_the_rows_before_the_first_refused_segment(llama, home, damage, native, monkeypatch):
    """Both read paths (restore_arrays.read_rows: in C into unwritten arrays, or in Python while
    the later arrays are made): a flipped byte in a block's last layer (its last bytes read),
    or a damaged tail, still ends the prefix there, the file is moved aside, and the rows kept
    are the saved ones."""
    import numpy as np

    from agentd import readhash, restore_arrays

    monkeypatch.setattr(restore_arrays, "NATIVE_READS", native)
    assert not native or readhash.load() is not None  # this machine has a C compiler: the C path runs

    store = AgentStore(home, llama, kv=SMALL)
    store.create("a", "", SYSTEM)
    store.chat("a", TURN1, max_tokens=6)
    if len(store._hot["a"].tokens) % 16 == 0:  # a tail to damage
        store.chat("a", "Go on.", max_tokens=3)
    store.save("a")
    hot = store._hot["a"]
    m = json.loads(store.cache_path("a").read_text())
    assert len(m["blocks"]) >= 3 and m["tail"]
    if damage == "block-last-layer":
        path, keep = home / "caches" / "blocks" / (m["blocks"][1] + ".kvb"), 16
        rows_end = trailer(path)["segments"][-1]
        offset = rows_end[2] + rows_end[3] - 8  # the last bytes of rows: the last array's
    else:
        path, keep = store.repo.agent_dir("a") / m["tail"]["file"], len(m["blocks"]) * 16
        offset = 100
    data = bytearray(path.read_bytes())
    if damage == "tail-truncated":
        data = data[:len(data) // 2]
    else:
        data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    assert restore_arrays.host_read_usable()
    again = AgentStore(home, llama, kv=SMALL)
    loaded = again.repo.load("a")
    assert loaded.tokens == hot.tokens[:keep]
    for want, got in zip(hot.cache, loaded.cache):
        assert got.offset == keep
        assert np.array_equal(np.array(want.keys[..., :keep, :]), np.array(got.keys[..., :keep, :]))
        assert np.array_equal(np.array(want.values[..., :keep, :]), np.array(got.values[..., :keep, :]))
    (problem,) = again.repo.problems
    assert problem.reason == ("truncated" if damage == "tail-truncated" else "checksum")
    assert not path.exists() and Path(problem.moved_to).exists()


@pytest.mark.parametrize("extra", [0, 1, 200])  # the agent ending on, just past, and well past a step
def test_a_restored_cache_has_a_step_to_spare_so_the_next_turn_does_not_grow_it(llama, home, extra):
    """mlx-lm grows a full cache by copying all of it into new memory (on CUDA at 32k
    tokens of llama-8B, 0.2 s for the first touch of that memory alone): a restore leaves at
    least one 256-token step of rows beyond what it holds."""
    from mlx_lm.models.cache import KVCache

    store = AgentStore(home, llama)
    store.create("a", "", "")
    hot = store.chat("a", "x " * 10, max_tokens=1)
    tokens = store._hot["a"].tokens
    # Prefill the agent to exactly 256 + extra tokens of some text, then save and reload.
    want = 256 + extra
    agent = store._hot["a"]
    filler = [(7 * i) % 200 + 20 for i in range(want - len(tokens))]
    agent.cache, agent.tokens = llama.prefill(agent.cache, tokens, tokens + filler)
    agent.dirty = True
    store.save("a")
    loaded = store.repo.load("a")
    assert hot.generated_tokens == 1 and len(loaded.tokens) == want
    for layer in loaded.cache:
        if type(layer) is KVCache:
            assert layer.offset == want
            assert layer.keys.shape[2] - want >= 256
    # What the start-up reserve (restore_reads.reserve_restores, CUDA) allocates for this
    # agent is exactly what its restore made: MLX's buffer cache reuses only that size.
    from agentd.restore_arrays import rows_to_allocate

    layout, n = store.repo.restore_rows("a")
    assert n == want and layout == layout_of(loaded.cache)
    assert all(layer.keys.shape[2] == rows_to_allocate(n) for layer in loaded.cache if type(layer) is KVCache)
    assert store.repo.restore_rows("nobody") is None


def test_the_start_up_restore_reserve_keeps_to_its_budget_and_never_fails_the_start(monkeypatch):
    """restore_reads.reserve_restores: the agents used last, in order, while their arrays
    fit the budget; an allocation that fails ends the reserve, not the daemon's start. On
    the CPU the arrays wait in MLX's cache, whose limit grows by their bytes until memory
    is given back. Off on Apple's GPU and with AGENTD_RESTORE_RESERVE=0."""
    import mlx.core as mx

    from agentd import backend, restore_reads
    from agentd.kvrows import ArraySpec, RowLayout
    from agentd.restore_arrays import rows_to_allocate

    layout = RowLayout((ArraySpec(0, 2, 8, "float32"), ArraySpec(0, 2, 8, "float32")))
    size = lambda n: layout.row_bytes() * rows_to_allocate(n)  # noqa: E731

    def cache_limit() -> int:
        value = mx.set_cache_limit(1 << 62)
        mx.set_cache_limit(value)
        return value

    limit = cache_limit()
    try:
        r = restore_reads.reserve_restores([(layout, 10), (layout, 5000)], size(10) + size(5000) - 1)
        assert (r.agents, r.bytes) == (1, size(10))  # the CPU: the real arrays, within the budget
        assert mx.get_cache_memory() >= size(10)
        assert cache_limit() == limit + size(10)
        restore_reads.give_back_unused()
        assert mx.get_cache_memory() == 0 and cache_limit() == limit
    finally:
        mx.set_cache_limit(limit)
    monkeypatch.setattr(backend, "backend", lambda: backend.METAL)
    assert restore_reads.reserve_restores([(layout, 10)], 10**9) is None
    monkeypatch.setattr(backend, "backend", lambda: backend.CUDA)
    made = []

    class Target:
        def __init__(self, layout, n):
            self.n = n

        def allocate(self):
            if self.n == 666:
                raise RuntimeError("out of memory")
            made.append(self.n)

        def take(self):
            return []

    monkeypatch.setattr(restore_reads, "RowTarget", Target)
    r = restore_reads.reserve_restores([(layout, 100), (layout, 300), (layout, 5000)], size(100) + size(300))
    assert (r.agents, r.bytes, made) == (2, size(100) + size(300), [100, 300])
    made.clear()
    r = restore_reads.reserve_restores([(layout, 100), (layout, 666), (layout, 300)], 10**9)
    assert (r.agents, made) == (1, [100])
    monkeypatch.setenv(restore_reads.RESERVE_ENV, "0")
    assert restore_reads.reserve_restores([(layout, 100)], 10**9) is None
