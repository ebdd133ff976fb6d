"""Turns of several messages (the `turn` op) and stateless completions (`complete`).

The HTTP front end's routes end here, through `Daemon.handle` like every socket request.
A turn has three stages, kept apart so a scheduler can run the middle one with others:

1. `prepare_turn` / `prepare_complete`: read the records, plan with `agentd.transcripts`
   (append, or follow a resent conversation and keep a replaced one as a branch), render
   the prompt with the request's tools. No model work; nothing is written.
2. the model: bring the cache to the prompt and decode (today `Engine.generate`).
3. `finish`: split tool calls off the reply and commit the records in one transaction
   (`Records.commit_turn`), so a cancelled or failed turn changes nothing.

Runs on the MLX thread, as `AgentStore` does.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from .agents import AgentStore, HotAgent
from .cachefile import cache_nbytes
from .engine import Generation
from .protocol import ErrorCode, ProtocolError
from .toolcalls import ToolCallText, splitter_for
from .transcripts import TurnPlan, plan_turn

log = logging.getLogger("agentd.turns")


@dataclass
class PreparedTurn:
    """Everything a turn needs before the model runs and everything it commits after."""

    name: str | None  # None: a stateless completion
    plan: TurnPlan
    system: str  # the system prompt the prompt was rendered with
    convo: list[dict]  # the conversation the reply answers
    prompt: list[int]
    response: dict | None
    splitter: ToolCallText | None
    on_token: Callable[[str], None] | None

    def stream(self, piece: str) -> None:
        """The `on_token` to give the model: tool-call text is held back, the rest passes."""
        shown = self.splitter.feed(piece) if self.splitter is not None else piece
        if shown and self.on_token is not None:
            self.on_token(shown)


class Turns:
    def __init__(self, store: AgentStore):
        self.store = store
        self._scratch: HotAgent | None = None  # the `complete` op's cache (no agent, never saved)

    def scratch_bytes(self) -> int:
        return self._scratch.nbytes if self._scratch is not None else 0

    # ---- 1. prepare -------------------------------------------------------------------

    def prepare_turn(self, name: str, messages: list[dict], *, follow: bool = False, system: str | None = None,
                     tools: list | None = None, response: dict | None = None,
                     on_token: Callable[[str], None] | None = None) -> PreparedTurn:
        rec = self.store.records.get(name)
        self._check_new_response(response)
        plan = plan_turn(rec.system, rec.messages, messages, follow=follow, system=system)
        new_system = rec.system if plan.system is None else plan.system
        convo = (rec.messages if plan.keep is None else rec.messages[: plan.keep]) + plan.new
        return self._prepared(name, plan, new_system, convo, tools, response, on_token)

    def prepare_complete(self, system: str, messages: list[dict], *, tools: list | None = None,
                         response: dict | None = None, on_token: Callable[[str], None] | None = None) -> PreparedTurn:
        plan = plan_turn(system, [], messages, follow=True, system=system)  # the same checks as a turn
        self._check_new_response(response)
        return self._prepared(None, plan, system, list(messages), tools, response, on_token)

    def _prepared(self, name, plan, system, convo, tools, response, on_token) -> PreparedTurn:
        try:
            prompt = self.store.engine.render(system, convo, tools=tools)
        except Exception as e:  # jinja raises many types; all mean this request cannot be rendered
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"the model's chat template cannot render this conversation: {type(e).__name__}: {e}")
        # Before any cache is loaded or prefilled: a conversation beyond the context is refused.
        self.store.engine.room_for_reply(len(prompt), 1, who=f"agent {name!r}: " if name else "")
        return PreparedTurn(name, plan, system, convo, prompt, response, splitter_for(self.store.engine.tokenizer, tools),
                            on_token)

    def _check_new_response(self, response: dict | None) -> None:
        if response is not None and self.store.records.has_response(response["id"]):
            raise ProtocolError(ErrorCode.ALREADY_EXISTS, f"a response with id {response['id']!r} already exists")

    # ---- 3. finish --------------------------------------------------------------------

    def finish(self, turn: PreparedTurn, gen: Generation, source: str, restore_ms: float) -> dict:
        """The turn's result fields; unless it was cancelled, it is committed first."""
        text, calls = gen.text, []
        if turn.splitter is not None:
            tail, calls = turn.splitter.finish()
            if tail and turn.on_token is not None:
                turn.on_token(tail)
            text = turn.splitter.text
        decode_tps = (len(gen.tokens) - 1) / gen.decode_s if len(gen.tokens) > 1 and gen.decode_s > 0 else 0.0
        result = {
            "text": text,
            "tool_calls": calls or None,
            "cache_source": "rebuilt" if gen.rebuilt else source,
            "cached_tokens": gen.reused_tokens,
            "prefilled_tokens": gen.prefilled_tokens,
            "generated_tokens": len(gen.tokens),
            "prompt_tokens": gen.prompt_tokens,
            "restore_ms": round(restore_ms, 3),
            "ttft_ms": round(gen.ttft_s * 1000 + restore_ms, 3),
            "decode_tokens_per_s": round(decode_tps, 2),
            "finish_reason": "tool_calls" if calls and gen.finish_reason == "stop" else gen.finish_reason,
        }
        if gen.finish_reason == "cancelled":
            return result
        reply = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        records = self.store.records
        if turn.name is None:
            if turn.response is not None:
                body = {"meta": turn.response["meta"], "result": result, "system": turn.system,
                        "messages": turn.convo + [reply]}
                records.put_response(turn.response["id"], None, len(turn.convo) + 1, json.dumps(body))
            return result
        plan = turn.plan
        branch = records.free_branch_name(turn.name) if plan.diverged else None
        stored = None
        if turn.response is not None:
            stored = (turn.response["id"], json.dumps({"meta": turn.response["meta"], "result": result}))
        result["n_messages"] = records.commit_turn(turn.name, plan.new + [reply], keep=plan.keep, system=plan.system,
                                                   branch=branch, response=stored)
        result["branch"] = branch
        if branch:
            log.info("agent %s: replaced transcript kept as %s", turn.name, branch)
        return result

    # ---- the three together, one turn at a time -----------------------------------------

    def turn(self, name: str, messages: list[dict], *, sampling: dict | None = None,
             should_stop: Callable[[], bool] | None = None, on_progress: Callable[[int, int], None] | None = None,
             **prepare) -> dict:
        """One turn of several messages (the `turn` op), committed before this returns. The
        result is the chat result plus `tool_calls`, `branch` (the agent a replaced
        transcript was kept as) and `n_messages`."""
        prepared = self.prepare_turn(name, messages, **prepare)
        agent, source, restore_ms = self.store.acquire(name)
        agent.busy += 1
        try:
            gen = self._generate(agent, prepared, sampling, should_stop, on_progress)
            return self.finish(prepared, gen, source, restore_ms)
        finally:
            agent.busy -= 1

    def complete(self, system: str, messages: list[dict], *, sampling: dict | None = None,
                 should_stop: Callable[[], bool] | None = None, on_progress: Callable[[int, int], None] | None = None,
                 **prepare) -> dict:
        """A stateless completion with the base model (the `complete` op): nothing is
        recorded but the Responses object, if asked for. One scratch cache, kept in memory
        between calls, gives prefix reuse to clients that resend a growing conversation."""
        prepared = self.prepare_complete(system, messages, **prepare)
        if self._scratch is None:
            self._scratch = HotAgent("", self.store.engine.new_cache(), [])
        gen = self._generate(self._scratch, prepared, sampling, should_stop, on_progress)
        return self.finish(prepared, gen, "memory" if gen.reused_tokens else "new", 0.0)

    def _generate(self, agent: HotAgent, turn: PreparedTurn, sampling, should_stop, on_progress) -> Generation:
        sampling = dict(sampling or {})
        sampling["max_tokens"] = self.store.engine.room_for_reply(len(turn.prompt), sampling.get("max_tokens", 256))
        cache, gen = self.store.engine.generate(agent.cache, agent.tokens, turn.prompt, **sampling,
                                                on_token=turn.stream, should_stop=should_stop,
                                                on_progress=on_progress)
        agent.cache, agent.tokens = cache, gen.cache_tokens
        # The scratch cache is never saved; a cancelled turn is not recorded, so it makes
        # nothing to save either (see AgentStore.chat).
        agent.dirty = agent.dirty or (bool(agent.name) and gen.finish_reason != "cancelled")
        agent.nbytes = cache_nbytes(cache)
        agent.last_used = time.time()
        return gen
