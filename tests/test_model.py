"""The promise users rely on, on the real default model (SmolLM2-135M-Instruct).

Kept short: MLX on a CPU without a fast BLAS prefills this model at ~10 tokens/s.
"""

from __future__ import annotations

import pytest

from daemonproc import DaemonProc

pytestmark = pytest.mark.model

SYSTEM = "You are a concise technical specialist."
TURN1 = "Our payment API returns error 500 at checkout. Why?"
TURN2 = "How do we fix it?"


def _chat(client, name, message, max_tokens):
    return client.chat(name, message, max_tokens=max_tokens).wait()


def test_agent_saved_after_turn_1_answers_turn_2_in_a_new_daemon_exactly_as_in_memory(home, default_model_dir):
    with DaemonProc(home, default_model_dir, "--flush-interval", "3600") as d:
        with d.client(timeout=600) as c:
            for name in ("x", "twin"):
                c.create(name, role="Technical Specialist", system=SYSTEM)
                first = _chat(c, name, TURN1, 12)
            in_memory = _chat(c, "twin", TURN2, 12)
        assert d.stop() == 0
    with DaemonProc(home, default_model_dir) as d:
        with d.client(timeout=600) as c:
            resumed = _chat(c, "x", TURN2, 12)
            history = c.history("x")["messages"]
    assert first["cache_source"] == "new"
    assert in_memory["cache_source"] == "memory"
    assert resumed["cache_source"] == "disk"
    assert resumed["cached_tokens"] == in_memory["cached_tokens"] > 0
    assert resumed["text"] == in_memory["text"] and resumed["text"].strip()
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
