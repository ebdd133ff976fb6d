"""Many agents at once, on a real daemon: the scheduler batches their turns, and each
agent ends with exactly its own transcript and a cache of exactly its own tokens."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest

from agentd import cachefile
from agentd.engine import Engine
from agentctl.client import AgentdError
from daemonproc import DaemonProc

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. "
QUESTIONS = ["Why does checkout fail?", "Which log line shows it?", "How do we fix it?"]


def run_concurrently(fns):
    results, errors = [None] * len(fns), []

    def call(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # reported by the test, never swallowed
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def conversation(d: DaemonProc, name: str):
    """One client's turns with one agent: what it sent and what it was streamed."""
    turns = []
    with d.client() as c:
        for q in QUESTIONS:
            stream = c.chat(name, f"{name}: {q}", max_tokens=12)
            streamed = "".join(stream)
            turns.append((f"{name}: {q}", streamed, stream.result))
    return turns


def assert_cache_is_its_own(engine: Engine, caches_dir, name, expect):
    """The saved cache holds keys and values of exactly its token list: it predicts the next
    token as a cache prefilled afresh from those tokens does (a row mixed up in a batch, or
    a padding row left in, would not)."""
    from agentd.cacherepo import CacheRepository

    loaded = CacheRepository(caches_dir, expect, engine.new_cache).load(name)
    fresh, _ = engine.prefill(engine.new_cache(), [], loaded.tokens)
    probe = loaded.tokens[-1]
    saved_logits = engine.decode_logits([probe], loaded.cache)
    fresh_logits = engine.decode_logits([probe], fresh)
    assert mx.allclose(saved_logits, fresh_logits, atol=1e-3).item()
    return loaded.tokens


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_concurrent_turns_on_several_agents_keep_transcripts_and_caches_apart(home, model, tiny_llama_dir,
                                                                            tiny_gemma_dir):
    model_dir = tiny_llama_dir if model == "llama" else tiny_gemma_dir
    names = ["a", "b", "c", "d"]
    with DaemonProc(home, model_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            for n in names:
                c.create(n, system=f"{SYSTEM} You are agent {n}.")
        conversations = run_concurrently([lambda n=n: conversation(d, n) for n in names])
        with d.client() as c:
            histories = {n: c.history(n)["messages"] for n in names}
            scheduler = c.status()["scheduler"]
            for n in names:
                c.evict(n)  # saves each cache file
    if model == "llama":  # every layer a plain KVCache: the turns decoded as one batch
        assert scheduler["batched_steps"] > 0 and scheduler["max_batch"] >= 2
    engine = Engine(model_dir)
    expect = cachefile.Expectation(engine.fingerprint, engine.tokenizer_fingerprint, engine.dtype)
    for n, turns in zip(names, conversations):
        expected = []
        for sent, streamed, result in turns:
            assert result["text"] == streamed and result["finish_reason"] in ("stop", "length")
            expected += [{"role": "user", "content": sent}, {"role": "assistant", "content": streamed}]
        assert histories[n] == expected
        tokens = assert_cache_is_its_own(engine, home / "data" / "caches", n, expect)
        # The tokens are this agent's transcript as the template renders it, up to the last
        # reply (whose final sampled id is never fed back).
        prompt = engine.render(f"{SYSTEM} You are agent {n}.", expected[:-1])
        if model == "gemma3" and tokens == engine.render(f"{SYSTEM} You are agent {n}.", expected,
                                                         add_generation_prompt=False):
            continue  # the last reply did not render back to its ids: the cache holds it as rendered (windows.py)
        assert tokens[: len(prompt)] == prompt
        fed_reply = engine.tokenizer.decode(tokens[len(prompt):]).strip()
        assert expected[-1]["content"].strip().startswith(fed_reply)


def test_greedy_turns_decoded_in_one_batch_give_the_replies_they_give_alone(home, tiny_llama_dir):
    """With agentd's few-row kernels (products, and attention and SwiGLU as MLX graph nodes),
    each row of a batched decode step is the same bits as that agent's solo step, so three
    greedy turns run at once reply exactly as the same turns run one after another."""
    names = ["a", "b", "c"]

    def ask(d, agent, n):
        with d.client() as c:
            return c.chat(agent, f"Agent {n}, report on the incident.", max_tokens=24).wait()["text"]

    def brief(n):
        return f"{SYSTEM} You are agent {n}, " + "with a longer brief " * names.index(n)

    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            if c.status()["model"].get("attention") != "graph":
                pytest.skip("agentd's graph kernels are not in use here (no OpenBLAS or compiler)")
            for n in names:
                c.create(n, system=brief(n))
                c.create(f"{n}-alone", system=brief(n))
        together = run_concurrently([lambda n=n: ask(d, n, n) for n in names])
        with d.client() as c:
            assert c.status()["scheduler"]["max_batch"] >= 2
        alone = [ask(d, f"{n}-alone", n) for n in names]
    assert together == alone and all(together)


def test_cancelling_one_of_three_concurrent_turns_ends_only_that_turn(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir, "--flush-interval", "3600") as d:
        with d.client() as c:
            for n in ("keep1", "keep2", "gone"):
                c.create(n, system=SYSTEM)
        leaving = d.client()
        stream = leaving.chat("gone", "Tell me everything, at length.", max_tokens=8192)
        next(iter(stream))  # it is generating

        def finish(n):
            with d.client() as c:
                return c.chat(n, "Explain the failure.", max_tokens=64).wait()

        keepers = [threading.Thread(target=lambda n=n: results.setdefault(n, finish(n))) for n in ("keep1", "keep2")]
        results: dict = {}
        for t in keepers:
            t.start()
        stream.close()  # the client goes away mid-stream: that turn is cancelled
        leaving.close()
        for t in keepers:
            t.join(timeout=300)
        assert set(results) == {"keep1", "keep2"}
        for r in results.values():
            assert r["finish_reason"] in ("stop", "length") and r["generated_tokens"] >= 1
        with d.client() as c:
            assert c.history("gone")["messages"] == []  # a cancelled turn is not recorded
            assert len(c.history("keep1")["messages"]) == 2
            again = c.chat("gone", "Short answer, please.", max_tokens=4).wait()
            assert again["finish_reason"] in ("stop", "length")
            assert not any(a.get("busy") for a in c.status()["agents"])
    assert "Traceback" not in d.stderr()


def test_a_second_chat_to_an_agent_mid_turn_waits_for_the_first(home, tiny_llama_dir):
    """Documented behaviour: turns to one agent run in arrival order, never interleaved."""
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
        first, second = run_concurrently([
            lambda: d.client().chat("a", "first", max_tokens=24).wait(),
            lambda: (threading.Event().wait(0.2), d.client().chat("a", "second", max_tokens=4).wait())[1],
        ])
        with d.client() as c:
            history = c.history("a")["messages"]
    assert [m["content"] for m in history] == ["first", first["text"], "second", second["text"]]
    assert second["cached_tokens"] > 0  # it started from the first turn's cache


def test_stop_strings_end_the_reply_before_them_streamed_and_recorded(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("a", system=SYSTEM)
            free = c.chat("a", "Say something.", max_tokens=24).wait()
            c.reset("a")
            assert len(free["text"]) > 4
            stop = free["text"][3:5]  # occurs in the reply the model gives to this prompt
            stream = c.chat("a", "Say something.", max_tokens=24, stop=[stop])
            streamed = "".join(stream)
            history = c.history("a")["messages"]
    cut = free["text"][: free["text"].find(stop)]
    assert stream.result["text"] == streamed == cut
    assert stream.result["finish_reason"] == "stop"
    assert history[-1] == {"role": "assistant", "content": cut}


class _Seq:
    def __init__(self):
        self.done = False


class _Turn:
    def __init__(self, agent):
        self.agent, self.seq = agent, _Seq()


class _Plan:
    def __init__(self, agent):
        self.agent = agent

    def begin(self, store):
        return _Turn(self.agent)

    def end(self, store, turn):
        return turn.agent

    def abort(self, store, turn):
        pass


class _Stepper:
    """Records which turns each step carried; a turn ends after `steps` steps of its own."""

    def __init__(self, steps=1, step_s=0.0):
        self.carried, self.steps, self.step_s, self.group = [], steps, step_s, None

    def step(self, seqs):
        self.carried.append(len(seqs))
        time.sleep(self.step_s)
        for s in seqs:
            s.ran = getattr(s, "ran", 0) + 1
            s.done = s.ran >= self.steps

    def release(self, seq):
        pass


def _scheduler(stepper):
    import agentd.scheduler as sched

    s = sched.Scheduler(name="test-mlx")
    s.store, s.stepper = object(), stepper
    return s


def test_turns_sent_just_after_one_another_by_a_program_that_runs_agents_side_by_side_start_together(monkeypatch):
    import agentd.scheduler as sched

    monkeypatch.setattr(sched, "ADMIT_WINDOW_S", 0.3)  # wide: this machine's threads are slow to wake
    stepper = _Stepper(steps=3, step_s=0.05)
    s = _scheduler(stepper)
    # First, two turns in flight at once (the second arrives mid-turn): side by side.
    a = s.submit_turn(_Plan("a"))
    time.sleep(0.02)
    b = s.submit_turn(_Plan("b"))
    assert (a.result(10), b.result(10)) == ("a", "b")
    stepper.carried.clear()
    c = s.submit_turn(_Plan("c"))
    time.sleep(0.03)  # arrives 30 ms later: within the window, before any step
    d = s.submit_turn(_Plan("d"))
    assert (c.result(10), d.result(10)) == ("c", "d")
    assert stepper.carried[0] == 2


def test_a_lone_agents_turn_starts_at_once(monkeypatch):
    import agentd.scheduler as sched

    monkeypatch.setattr(sched, "ADMIT_WINDOW_S", 0.3)
    stepper = _Stepper(steps=1)
    s = _scheduler(stepper)
    t0 = time.monotonic()
    assert s.submit_turn(_Plan("a")).result(10) == "a"
    assert time.monotonic() - t0 < 0.25  # no window: nothing ran side by side lately
    assert stepper.carried == [1]


def test_a_programs_first_turns_sent_at_once_start_together_when_its_clients_are_connected(monkeypatch):
    """No turns ran side by side yet (a program's first turns, as in the demo), but more
    than one client is connected: the first turn waits the window for the others."""
    import agentd.scheduler as sched

    monkeypatch.setattr(sched, "ADMIT_WINDOW_S", 0.3)
    stepper = _Stepper(steps=3, step_s=0.05)
    s = _scheduler(stepper)
    s.clients = 2  # what the server counts: greeted connections open
    a = s.submit_turn(_Plan("a"))
    time.sleep(0.03)
    b = s.submit_turn(_Plan("b"))
    assert (a.result(10), b.result(10)) == ("a", "b")
    assert stepper.carried[0] == 2


def test_the_server_counts_greeted_connections_for_the_scheduler(home, tiny_llama_dir):
    with DaemonProc(home, tiny_llama_dir) as d:
        with d.client() as c1:
            c1.ping()
            with d.client() as c2:
                c2.ping()
                # c1 and c2 said hello (Client does on connect); the status reader is a third
                assert c1.status()["scheduler"]["clients"] == 2
            deadline = time.monotonic() + 5
            while c1.status()["scheduler"]["clients"] != 1 and time.monotonic() < deadline:
                time.sleep(0.02)  # the server notices c2's close on its own thread
            assert c1.status()["scheduler"]["clients"] == 1
