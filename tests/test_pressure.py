"""Memory pressure, injected through AGENTD_MEMORY_PROBE into a real daemon: evictions go
oldest first, clean before dirty, one per tick while the pressure lasts, never an agent
with a request in flight, and MLX's active memory really falls."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentctl.client import AgentdError
from agentd.memory import HotFacts, Limits, Reading, choose_evictions
from daemonproc import DaemonProc

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. "
PLENTY = 10**12


def chat(client, name, message, max_tokens=4):
    stream = client.chat(name, message, max_tokens=max_tokens)
    pieces = list(stream)
    result = stream.wait()
    assert "".join(pieces) == result["text"]
    return result


def set_pressure(path, available=PLENTY, level="normal"):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"available": available, "level": level}))
    tmp.replace(path)  # the daemon never reads half a reading


def states(c) -> dict[str, str]:
    return {a["name"]: a["state"] for a in c.status()["agents"]}


def watch_evictions(c, until: int, timeout: float) -> list[tuple[str, float]]:
    """(name, time) as agents go cold, until `until` of them are cold."""
    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout
    while len(seen) < until and time.monotonic() < deadline:
        cold = [n for n, s in states(c).items() if s == "cold"]
        seen += [(n, time.monotonic()) for n in cold if n not in {m for m, _ in seen}]
        time.sleep(0.03)
    return seen


def test_pressure_evicts_clean_before_dirty_oldest_first_one_per_tick_and_frees_memory(home, tiny_llama_dir):
    probe = home / "pressure.json"
    home.mkdir(exist_ok=True)
    set_pressure(probe)
    env = {"AGENTD_MEMORY_PROBE": f"file:{probe}"}
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600", "--min-available", "1GB", env=env) as d:
        with d.client() as c:
            for n in ("a", "b", "c", "d"):  # LRU order a, b, c, d
                c.create(n, system=SYSTEM * 60 + f"You are agent {n}.")
                chat(c, n, "hello")
            for n in ("b", "d"):
                c.save(n)  # b and d are clean, a and c dirty
            before = c.status()["memory"]
            assert set(states(c).values()) == {"hot"} and before["cache_bytes"] > 1_000_000

            set_pressure(probe, level="critical")
            first = watch_evictions(c, until=2, timeout=10)
            set_pressure(probe)  # relief: evictions stop
            assert [n for n, _ in first] == ["b", "d"], first  # clean ones first, oldest first
            assert first[1][1] - first[0][1] >= 0.5  # one per tick, not all at once
            time.sleep(2.5)
            assert states(c) == {"a": "hot", "b": "cold", "c": "hot", "d": "cold"}

            set_pressure(probe, available=10**8)  # below --min-available, level normal
            rest = watch_evictions(c, until=4, timeout=10)
            assert [n for n, _ in rest] == ["b", "d", "a", "c"], rest
            assert rest[3][1] - rest[2][1] >= 0.5
            after = c.status()
            assert after["memory"]["cache_bytes"] == 0
            assert not any(a["dirty"] for a in after["agents"])  # dirty ones were saved on the way out
            freed = before["active_bytes"] - after["memory"]["active_bytes"]
            assert freed >= before["cache_bytes"] * 0.5, (before, after["memory"])
            set_pressure(probe)
            assert {chat(c, n, "back")["cache_source"] for n in "abcd"} == {"disk"}
    print(f"\nactive bytes {before['active_bytes']} -> {after['memory']['active_bytes']} "
          f"(caches {before['cache_bytes']} -> 0)")


def test_an_agent_with_a_request_in_flight_is_never_evicted(home, tiny_llama_dir):
    probe = home / "pressure.json"
    home.mkdir(exist_ok=True)
    set_pressure(probe)
    env = {"AGENTD_MEMORY_PROBE": f"file:{probe}"}
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600", env=env) as d:
        with d.client() as c:
            c.create("busy", system=SYSTEM)
            chat(c, "busy", "hello")
        talker = d.client()
        stream = talker.chat("busy", "go on for a long while", max_tokens=8192)
        next(iter(stream))  # generating now
        set_pressure(probe, level="critical")
        with d.client() as c:
            during = []
            for _ in range(10):
                with pytest.raises(AgentdError) as err:
                    c.evict("busy")
                assert err.value.code == "BUSY"
                during.append(states(c)["busy"])
                time.sleep(0.1)
            assert set(during) == {"hot"}
            stream.close()  # cancelled; once it has stopped the pressure takes the agent
            talker.close()
            assert watch_evictions(c, until=1, timeout=10)[0][0] == "busy"


# ---- the policy itself ----------------------------------------------------------------

hot_sets = st.lists(
    st.tuples(st.integers(0, 10**6), st.booleans(), st.booleans()), max_size=12
).map(lambda xs: [HotFacts(f"a{i}", n, dirty, busy) for i, (n, dirty, busy) in enumerate(xs)])


@settings(max_examples=300, deadline=None)
@given(hot=hot_sets, max_hot=st.integers(1, 12), budget=st.integers(0, 5 * 10**6),
       available=st.integers(0, 2 * 10**9), level=st.sampled_from(["normal", "warn", "critical"]))
def test_choose_evictions_policy(hot, max_hot, budget, available, level):
    limits = Limits(max_hot, budget, 10**9)
    reading = Reading(available, 16 * 10**9, level)
    chosen = choose_evictions(hot, limits, reading)
    by_name = {a.name: a for a in hot}
    assert len(set(chosen)) == len(chosen)
    assert not any(by_name[n].busy for n in chosen)  # never an agent with a request in flight
    candidates = [a.name for a in sorted((a for a in hot if not a.busy), key=lambda a: a.dirty)]
    assert chosen == candidates[: len(chosen)]  # clean before dirty, oldest first within each
    within = choose_evictions(hot, limits, None)
    pressured = available < limits.min_available or level == "critical"
    assert len(chosen) == len(within) + (1 if pressured and len(within) < len(candidates) else 0)  # one per tick
    left = [a for a in hot if a.name not in within]
    if len(within) < len(candidates):  # not out of candidates: the limits now hold
        assert len(left) <= max_hot and sum(a.nbytes for a in left) <= budget


def test_the_completions_scratch_cache_counts_in_the_budget_and_goes_first(home, tiny_llama_dir):
    """The `complete` op's cache (the base model's id over HTTP) counts in the caches'
    bytes; over the cache budget it goes (an agent within the budget stays hot), and the
    next completion still runs, prefilling again."""
    from openai import OpenAI

    probe = home / "pressure.json"
    home.mkdir(exist_ok=True)
    set_pressure(probe)
    env = {"AGENTD_MEMORY_PROBE": f"file:{probe}"}
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600", "--http", "127.0.0.1:0",
                    "--cache-budget", "300KB", env=env) as d:
        with d.client() as c:
            c.create("kept", system="Be brief.")
            chat(c, "kept", "hello")
            status = c.status()
            agent_bytes = status["memory"]["cache_bytes"]
            assert 0 < agent_bytes < 300_000 and states(c) == {"kept": "hot"}
            http = status["http"]
            api = OpenAI(base_url=http["base_url"], api_key=open(http["token_file"]).read().strip())
            convo = [{"role": "system", "content": SYSTEM * 40}, {"role": "user", "content": "Why?"}]
            model = status["model"]["id"]
            first = api.chat.completions.create(model=model, messages=convo, max_tokens=2)
            assert first.usage.prompt_tokens > 600

            deadline = time.monotonic() + 10  # dropped after the turn, or at the next tick
            while c.status()["memory"]["cache_bytes"] > agent_bytes and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.status()["memory"]["cache_bytes"] == agent_bytes
            assert states(c) == {"kept": "hot"}  # the scratch went, the agent within the budget stayed

            again = api.chat.completions.create(model=model, messages=convo, max_tokens=2)
            assert again.usage.prompt_tokens == first.usage.prompt_tokens
            assert not (again.usage.prompt_tokens_details and again.usage.prompt_tokens_details.cached_tokens)
