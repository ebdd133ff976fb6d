"""A Gemma 3 agent whose sliding windows have wrapped keeps its cache across turns even when a
reply's text does not render back to the ids generated (agentd.windows): the next turn
prefills its own messages and that reply, not the whole conversation."""

from __future__ import annotations

import pytest

from agentd.agents import AgentStore
from agentd.engine import Engine, common_prefix_len

SYSTEM = "You are a technical specialist. " * 30
QUESTIONS = ["The payment API returns a 500 error.", "What now?", "And then?", "Who owns the fix?",
             "Which metric should we watch?", "Summarise in one line."]


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return Engine(tiny_gemma_dir)


def test_a_reply_that_does_not_render_back_costs_its_own_tokens_not_a_rebuild(gemma, home):
    store = AgentStore(home, gemma)
    store.create("a", "", SYSTEM)
    parted = 0  # turns whose reply rendered again leaves the cache (what this is about)
    for i, q in enumerate(QUESTIONS):
        before = list(store._hot["a"].tokens) if i else []
        r = store.chat("a", q, max_tokens=24)
        rec = store.records.get("a")
        rendered = gemma.render(rec.system, rec.messages, add_generation_prompt=False)
        agent = store._hot["a"]
        # The cache always holds a prefix of the transcript as the next prompt renders it ...
        assert common_prefix_len(agent.tokens, rendered) == len(agent.tokens)
        if i:
            # ... so no turn after the first starts over, though the windows (16 tokens) wrapped.
            assert r.cache_source == "memory" and r.cached_tokens >= len(before) - 40, (i, r)
            assert r.prefilled_tokens < r.prompt_tokens // 2
        parted += agent.tokens == rendered  # went back before the turn, then prefilled it as rendered
    assert parted, "no reply parted from its render: the test proves nothing with this model"


def test_without_the_copy_such_a_turn_would_rebuild(gemma, home, monkeypatch):
    """The failure the copy prevents, shown: with it switched off, a parted reply makes the
    next turn prefill everything."""
    import agentd.windows as windows

    monkeypatch.setattr(windows, "snapshot", lambda *a, **k: None)
    store = AgentStore(home, gemma)
    store.create("a", "", SYSTEM)
    sources = [store.chat("a", q, max_tokens=24).cache_source for q in QUESTIONS]
    assert "rebuilt" in sources[1:]


def test_after_each_turn_the_agent_comes_back_from_disk_and_prefills_only_the_new_message(gemma, home):
    """What a restart sees: every turn's cache saved and loaded again (evict), Gemma's windows
    wrapped, replies that may not render back: never a rebuild of the conversation."""
    store = AgentStore(home, gemma)
    store.create("a", "", SYSTEM)
    store.chat("a", QUESTIONS[0], max_tokens=24)
    for q in QUESTIONS[1:]:
        store.evict("a")
        r = store.chat("a", q, max_tokens=24)
        assert r.cache_source == "disk" and r.prefilled_tokens <= 40, r
