"""Turns of several messages (the `turn` op) and stateless completions (`complete`).

The HTTP front end's routes end here, through `Daemon.handle` like every socket request:
a turn follows `agentd.transcripts` (append, or follow a resent conversation and keep a
replaced one as a branch), renders tools into the prompt, generates in the agent's cache,
splits tool calls off the reply and commits the records in one transaction. Each op is a
plan the scheduler runs on the MLX thread like a chat: `begin` when admitted (the reply is
then generated in batched steps beside every other turn), `end` when finished.
"""

from __future__ import annotations

import json
import logging

from .agents import AgentStore, HotAgent
from .protocol import ErrorCode, ProtocolError, Sampling
from .toolcalls import splitter_for
from .transcripts import plan_turn

log = logging.getLogger("agentd.turns")


class Turns:
    """Builds the scheduler's turn plans for the `turn` and `complete` ops."""

    def __init__(self, store: AgentStore):
        self.store = store
        self._scratch: HotAgent | None = None  # the `complete` op's cache (no agent, never saved)

    def scratch_bytes(self) -> int:
        return self._scratch.nbytes if self._scratch is not None else 0

    def turn(self, name: str, messages: list[dict], *, follow: bool = False, system: str | None = None,
             tools: list | None = None, response: dict | None = None, sampling: Sampling | None = None,
             on_token=None, should_stop=None, on_progress=None) -> "AgentTurnPlan":
        """One turn of several messages (the `turn` op), committed before its result exists.

        The plan (append, or follow with a branch for a replaced transcript) comes from
        `agentd.transcripts`; the records change in one transaction after the reply, so a
        cancelled or failed turn changes nothing. The result is the chat result plus
        `tool_calls`, `branch` (where a replaced transcript was kept) and `n_messages`.
        """
        return AgentTurnPlan(self, name, messages, follow, system, tools, response, sampling or Sampling(),
                             on_token, should_stop, on_progress)

    def complete(self, system: str, messages: list[dict], *, tools: list | None = None, response: dict | None = None,
                 sampling: Sampling | None = None, on_token=None, should_stop=None,
                 on_progress=None) -> "CompletePlan":
        """A stateless completion with the base model (the `complete` op): nothing is
        recorded but the Responses object, if asked for. One scratch cache, kept in memory
        between calls, gives prefix reuse to clients that resend a growing conversation
        (completions therefore run one at a time, in arrival order)."""
        return CompletePlan(self, system, messages, tools, response, sampling or Sampling(), on_token, should_stop,
                            on_progress)

    def _check_new_response(self, response: dict | None) -> None:
        if response is not None and self.store.records.has_response(response["id"]):
            raise ProtocolError(ErrorCode.ALREADY_EXISTS, f"a response with id {response['id']!r} already exists")

    def _open(self, agent: HotAgent, source, restore_ms, system, convo, tools, sampling, on_token, should_stop,
              on_progress):
        """Start generating the reply to `convo` in `agent`'s cache: (Turn, tool-call splitter)."""
        splitter = splitter_for(self.store.engine.tokenizer, tools)
        emit = on_token
        if splitter is not None:
            def emit(piece: str) -> None:
                shown = splitter.feed(piece)
                if shown and on_token is not None:
                    on_token(shown)
        try:
            prompt = self.store.engine.render(system, convo, tools=tools)
        except Exception as e:  # jinja raises many types; all mean this request cannot be rendered
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"the model's chat template cannot render this conversation: {type(e).__name__}: {e}")
        turn = self.store.open_turn(agent, source, restore_ms, prompt, sampling, [],
                                    on_token=emit, should_stop=should_stop, on_progress=on_progress)
        return turn, splitter

    def _reply(self, turn, splitter, on_token) -> tuple[dict, dict]:
        """The finished turn's cache back to its agent; (result fields, reply message)."""
        gen = self.store.close_turn(turn)
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
        _with_source(result, turn.source, turn.restore_ms)
        return result, reply


class AgentTurnPlan:
    """The `turn` op as the scheduler runs it: begin (plan, render, prepare), end (commit)."""

    def __init__(self, turns: Turns, name, messages, follow, system, tools, response, sampling, on_token,
                 should_stop, on_progress):
        self.turns, self.agent = turns, name
        self.messages, self.follow, self.system, self.tools, self.response = messages, follow, system, tools, response
        self.sampling, self.on_token, self.should_stop, self.on_progress = sampling, on_token, should_stop, on_progress

    def begin(self, store: AgentStore):
        rec = store.records.get(self.agent)
        self.turns._check_new_response(self.response)
        self.plan = plan_turn(rec.system, rec.messages, self.messages, follow=self.follow, system=self.system)
        new_system = rec.system if self.plan.system is None else self.plan.system
        convo = (rec.messages if self.plan.keep is None else rec.messages[: self.plan.keep]) + self.plan.new
        agent, source, restore_ms = store.acquire(self.agent)
        turn, self.splitter = self.turns._open(agent, source, restore_ms, new_system, convo, self.tools, self.sampling,
                                               self.on_token, self.should_stop, self.on_progress)
        return turn

    def end(self, store: AgentStore, turn) -> dict:
        result, reply = self.turns._reply(turn, self.splitter, self.on_token)
        if result["finish_reason"] != "cancelled":
            name, plan, response = self.agent, self.plan, self.response
            branch = store.records.free_branch_name(name) if plan.diverged else None
            stored = None
            if response is not None:
                stored = (response["id"], json.dumps({"meta": response["meta"], "result": result}))
            result["n_messages"] = store.records.commit_turn(
                name, plan.new + [reply], keep=plan.keep, system=plan.system, branch=branch, response=stored
            )
            result["branch"] = branch
            if branch:
                log.info("agent %s: replaced transcript kept as %s", name, branch)
        return result

    def abort(self, store: AgentStore, turn) -> None:
        store.abort_turn(turn)


class CompletePlan:
    """The `complete` op as the scheduler runs it, in the one scratch cache."""

    agent = ""  # the scratch cache's key: completions queue behind each other, not behind agents

    def __init__(self, turns: Turns, system, messages, tools, response, sampling, on_token, should_stop, on_progress):
        self.turns, self.system, self.messages, self.tools, self.response = turns, system, messages, tools, response
        self.sampling, self.on_token, self.should_stop, self.on_progress = sampling, on_token, should_stop, on_progress

    def begin(self, store: AgentStore):
        plan_turn(self.system, [], self.messages, follow=True, system=self.system)  # the same checks as a turn
        self.turns._check_new_response(self.response)
        if self.turns._scratch is None:
            self.turns._scratch = HotAgent("", store.engine.new_cache(), [])
        turn, self.splitter = self.turns._open(self.turns._scratch, "new", 0.0, self.system, self.messages, self.tools,
                                               self.sampling, self.on_token, self.should_stop, self.on_progress)
        return turn

    def end(self, store: AgentStore, turn) -> dict:
        result, reply = self.turns._reply(turn, self.splitter, self.on_token)
        result["cache_source"] = "memory" if result["cached_tokens"] else "new"
        if self.response is not None and result["finish_reason"] != "cancelled":
            body = {"meta": self.response["meta"], "result": result, "system": self.system,
                    "messages": self.messages + [reply]}
            store.records.put_response(self.response["id"], None, len(self.messages) + 1, json.dumps(body))
        return result

    def abort(self, store: AgentStore, turn) -> None:
        turn.agent.busy -= 1
        self.turns._scratch = None  # its state is unknown after a failed step


def _with_source(result: dict, source: str, restore_ms: float) -> None:
    """Fill in where the cache came from and the restore time, as chat results have them."""
    result["cache_source"] = result["cache_source"] or source
    result["restore_ms"] = round(restore_ms, 3)
    result["ttft_ms"] = round(result["ttft_ms"] + restore_ms, 3)


