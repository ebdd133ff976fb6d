"""Turns of several messages (the `turn` op) and stateless completions (`complete`).

The HTTP front end's routes end here, through `Daemon.handle` like every socket request:
a turn follows `agentd.transcripts` (append, or follow a resent conversation and keep a
replaced one as a branch), renders tools into the prompt, generates in the agent's cache,
splits tool calls off the reply and commits the records in one transaction. Runs on the
MLX worker, as `AgentStore` does.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from .agents import AgentStore, HotAgent
from .cachefile import cache_nbytes
from .toolcalls import splitter_for
from .transcripts import plan_turn

log = logging.getLogger("agentd.turns")


class Turns:
    def __init__(self, store: AgentStore):
        self.store = store
        self._scratch: HotAgent | None = None  # the `complete` op's cache (no agent, never saved)

    def scratch_bytes(self) -> int:
        return self._scratch.nbytes if self._scratch is not None else 0

    def turn(
        self,
        name: str,
        messages: list[dict],
        *,
        follow: bool = False,
        system: str | None = None,
        tools: list | None = None,
        response: dict | None = None,
        sampling: dict | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """One turn of several messages (the `turn` op), committed before this returns.

        The plan (append, or follow with a branch for a replaced transcript) comes from
        `agentd.transcripts`; the records change in one transaction after the reply, so a
        cancelled or failed turn changes nothing. The result is the chat result plus
        `tool_calls`, `branch` (where a replaced transcript was kept) and `n_messages`.
        """
        rec = self.store.records.get(name)
        plan = plan_turn(rec.system, rec.messages, messages, follow=follow, system=system)
        new_system = rec.system if plan.system is None else plan.system
        convo = (rec.messages if plan.keep is None else rec.messages[: plan.keep]) + plan.new
        agent, source, restore_ms = self.store.acquire(name)
        agent.busy += 1
        try:
            result, reply = self._reply(agent, new_system, convo, tools, sampling, on_token, should_stop, on_progress)
            _with_source(result, source, restore_ms)
            if result["finish_reason"] != "cancelled":
                branch = self.store.records.free_branch_name(name) if plan.diverged else None
                stored = None
                if response is not None:
                    stored = (response["id"], json.dumps({"meta": response["meta"], "result": result}))
                result["n_messages"] = self.store.records.commit_turn(
                    name, plan.new + [reply], keep=plan.keep, system=plan.system, branch=branch, response=stored
                )
                result["branch"] = branch
                if branch:
                    log.info("agent %s: replaced transcript kept as %s", name, branch)
        finally:
            agent.busy -= 1
        return result

    def complete(
        self,
        system: str,
        messages: list[dict],
        *,
        tools: list | None = None,
        response: dict | None = None,
        sampling: dict | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """A stateless completion with the base model (the `complete` op): nothing is
        recorded but the Responses object, if asked for. One scratch cache, kept in memory
        between calls, gives prefix reuse to clients that resend a growing conversation."""
        plan_turn(system, [], messages, follow=True, system=system)  # the same checks as a turn
        if self._scratch is None:
            self._scratch = HotAgent("", self.store.engine.new_cache(), [])
        result, reply = self._reply(self._scratch, system, messages, tools, sampling, on_token, should_stop, on_progress)
        self._scratch.nbytes = cache_nbytes(self._scratch.cache)
        _with_source(result, "memory" if result["cached_tokens"] else "new", 0.0)
        if response is not None and result["finish_reason"] != "cancelled":
            body = {"meta": response["meta"], "result": result, "system": system, "messages": messages + [reply]}
            self.store.records.put_response(response["id"], None, len(messages) + 1, json.dumps(body))
        return result

    def _reply(self, agent: HotAgent, system: str, convo: list[dict], tools, sampling, on_token, should_stop,
               on_progress) -> tuple[dict, dict]:
        """Generate the reply to `convo` in `agent`'s cache; (result fields, reply message)."""
        splitter = splitter_for(self.store.engine.tokenizer, tools)
        emit = on_token
        if splitter is not None:
            def emit(piece: str) -> None:
                shown = splitter.feed(piece)
                if shown and on_token is not None:
                    on_token(shown)
        prompt = self.store.engine.render(system, convo, tools=tools)
        sampling = dict(sampling or {})
        # Before any prefill: a conversation beyond the model's context is refused, not truncated.
        sampling["max_tokens"] = self.store.engine.room_for_reply(
            len(prompt), sampling.get("max_tokens", 256), who=f"agent {agent.name!r}: " if agent.name else "")
        cache, gen = self.store.engine.generate(agent.cache, agent.tokens, prompt, **sampling, on_token=emit,
                                                should_stop=should_stop, on_progress=on_progress)
        agent.cache, agent.tokens = cache, gen.cache_tokens
        # A cancelled turn is not recorded and so makes nothing to save (see AgentStore.chat).
        agent.dirty = agent.dirty or (bool(agent.name) and gen.finish_reason != "cancelled")
        agent.nbytes = cache_nbytes(cache)
        agent.last_used = time.time()
        text, calls = gen.text, []
        if splitter is not None:
            tail, calls = splitter.finish()
            if tail and on_token is not None:
                on_token(tail)
            text = splitter.text
        reply = {"role": "assistant", "content": text}
        if calls:
            reply["tool_calls"] = calls
        decode_tps = (len(gen.tokens) - 1) / gen.decode_s if len(gen.tokens) > 1 and gen.decode_s > 0 else 0.0
        finish = "tool_calls" if calls and gen.finish_reason == "stop" else gen.finish_reason
        result = {
            "text": text,
            "tool_calls": calls or None,
            "cache_source": "rebuilt" if gen.rebuilt else None,
            "cached_tokens": gen.reused_tokens,
            "prefilled_tokens": gen.prefilled_tokens,
            "generated_tokens": len(gen.tokens),
            "prompt_tokens": gen.prompt_tokens,
            "ttft_ms": gen.ttft_s * 1000,
            "decode_tokens_per_s": round(decode_tps, 2),
            "finish_reason": finish,
        }
        return result, reply


def _with_source(result: dict, source: str, restore_ms: float) -> None:
    """Fill in where the cache came from and the restore time, as chat results have them."""
    result["cache_source"] = result["cache_source"] or source
    result["restore_ms"] = round(restore_ms, 3)
    result["ttft_ms"] = round(result["ttft_ms"] + restore_ms, 3)


