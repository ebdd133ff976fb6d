"""The turn ops as the scheduler runs them: chat (`ChatPlan`), turns of several messages (the
`turn` op) and stateless completions (`complete`).

The HTTP front end's routes end here, through `Daemon.handle` like every socket request.
A turn has three stages, kept apart so a scheduler can run the middle one with others:

1. `prepare_turn` / `prepare_complete`: read the records, plan with `agentd.transcripts`
   (append, or follow a resent conversation and keep a replaced one as a branch), render
   the prompt with the request's tools. No model work; nothing is written.
2. the model: the scheduler steps the turn's sequence beside every other turn in flight
   (`TurnOpPlan` is what it runs; scheduler.py).
3. `finish`: split tool calls off the reply and commit the records in one transaction
   (`Records.commit_turn`), so a cancelled or failed turn changes nothing.

Stages 1 and 3 run on the MLX thread when the scheduler admits and retires the turn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Callable

from .agents import AgentStore, HotAgent, Turn
from .protocol import ErrorCode, ProtocolError, Sampling
from .sequence import Generation
from .toolcalls import ToolCallText, splitter_for
from .transcripts import TurnPlan, plan_turn

log = logging.getLogger("agentd.turns")


class ChatPlan:
    """The chat op as the scheduler runs it: `begin` on admission, `end` on retirement.
    `agent` orders turns of one agent."""

    def __init__(self, name: str, new_messages: list[dict], sampling: Sampling, *, rebuild: bool = False,
                 on_token=None, on_progress=None, should_stop=None):
        self.agent, self.new_messages, self.sampling, self.rebuild = name, new_messages, sampling, rebuild
        self.callbacks = {"on_token": on_token, "on_progress": on_progress, "should_stop": should_stop}

    def begin(self, store: AgentStore) -> Turn:
        return store.begin_turn(self.agent, self.new_messages, self.sampling, rebuild=self.rebuild, **self.callbacks)

    def end(self, store: AgentStore, turn: Turn) -> dict:
        return store.end_turn(turn).to_wire()

    def abort(self, store: AgentStore, turn: Turn) -> None:
        store.abort_turn(turn)


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

    def drop_scratch(self) -> int:
        """Let the scratch cache go unless a completion is using it (on the MLX thread,
        between steps, as MemoryPolicy calls it): the bytes freed, 0 if none."""
        scratch = self._scratch
        if scratch is None or scratch.busy:
            return 0
        self._scratch = None
        scratch.cache = None
        self.store.free_unused_memory()
        return scratch.nbytes

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

    # ---- the three together, as a plan the scheduler runs beside other turns ----------

    def turn(self, name: str, messages: list[dict], *, sampling: Sampling | None = None,
             should_stop: Callable[[], bool] | None = None, on_progress: Callable[[int, int], None] | None = None,
             **prepare) -> "TurnOpPlan":
        """One turn of several messages (the `turn` op), committed before its result exists.
        The result is the chat result plus `tool_calls`, `branch` (the agent a replaced
        transcript was kept as) and `n_messages`."""
        return TurnOpPlan(self, name, sampling or Sampling(), should_stop, on_progress,
                          lambda: self.prepare_turn(name, messages, **prepare))

    def complete(self, system: str, messages: list[dict], *, sampling: Sampling | None = None,
                 should_stop: Callable[[], bool] | None = None, on_progress: Callable[[int, int], None] | None = None,
                 **prepare) -> "TurnOpPlan":
        """A stateless completion with the base model (the `complete` op): nothing is
        recorded but the Responses object, if asked for. One scratch cache, kept in memory
        between calls, gives prefix reuse to clients that resend a growing conversation
        (so completions run one after another, in arrival order)."""
        return TurnOpPlan(self, None, sampling or Sampling(), should_stop, on_progress,
                          lambda: self.prepare_complete(system, messages, **prepare))


class TurnOpPlan:
    """A `turn` or `complete` as the scheduler runs it (see scheduler.TurnPlan): `begin`
    prepares and opens a sequence in the agent's (or the scratch) cache, the scheduler
    steps it with every other turn, `end` gives the cache back and finishes (commits)."""

    def __init__(self, turns: Turns, name: str | None, sampling: Sampling, should_stop, on_progress, prepare):
        self.turns, self.name, self.sampling = turns, name, sampling
        self.should_stop, self.on_progress, self._prepare = should_stop, on_progress, prepare
        # Completions share the scratch cache, so they queue behind each other (the key ""
        # is no agent's name); a turn queues behind its agent's turn in flight.
        self.agent = name if name is not None else ""

    def begin(self, store: AgentStore):
        self.prepared = self._prepare()
        if self.name is not None:
            agent, source, restore_ms = store.acquire(self.name)
        else:
            if self.turns._scratch is None:
                self.turns._scratch = HotAgent("", store.engine.new_cache(), [])
            agent, source, restore_ms = self.turns._scratch, None, 0.0
        # The reply ends where the context does (the prompt itself was checked in _prepared).
        room = store.engine.room_for_reply(len(self.prepared.prompt), self.sampling.max_tokens)
        sampling = self.sampling if room >= self.sampling.max_tokens else dataclasses.replace(self.sampling, max_tokens=room)
        return store.open_turn(agent, source, restore_ms, self.prepared.prompt, sampling, [],
                               on_token=self.prepared.stream, should_stop=self.should_stop,
                               on_progress=self.on_progress)

    def end(self, store: AgentStore, turn) -> dict:
        gen = store.close_turn(turn)
        source = turn.source if self.name is not None else ("memory" if gen.reused_tokens else "new")
        return self.turns.finish(self.prepared, gen, source, turn.restore_ms)

    def abort(self, store: AgentStore, turn) -> None:
        if self.name is not None:
            store.abort_turn(turn)
        else:
            turn.agent.busy -= 1
            self.turns._scratch = None  # its state is unknown after a failed step
