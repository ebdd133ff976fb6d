"""How a turn's messages map onto an agent's stored transcript (pure; no model, no records).

Two ways to send a turn (the `turn` op of `agentd.protocol`):

- append: the messages are new; they go after everything stored (the Responses API, the
  socket's `chat`).
- follow: the messages are the whole conversation, as Chat Completions clients resend it
  each call. If they extend the stored transcript, only the new tail is appended (and only
  it is prefilled). If they diverge (another system prompt, an edited or dropped turn),
  the agent follows the request: its records become the common prefix plus the request's
  tail, and the replaced transcript is first kept as a branch (see `Records.commit_turn`).

A request without a system prompt (system None) keeps the agent's; an empty string is a
system prompt of its own ("no system prompt"), so it diverges from a non-empty one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .protocol import ErrorCode, ProtocolError


@dataclass(frozen=True)
class TurnPlan:
    """What a turn does to the records, decided before any model work."""

    keep: int | None  # stored messages kept before the new ones; None: all of them
    new: list[dict]  # appended before the reply
    system: str | None  # the new system prompt, or None to keep the stored one
    diverged: bool  # the stored transcript is replaced (and must be kept as a branch first)


def _normalized(message: dict) -> tuple:
    """What makes two messages the same turn. Tool-call arguments are compared as JSON
    values, since clients re-serialize them (key order, spacing) when they send them back."""
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        calls.append((call.get("id"), fn.get("name"), json.dumps(args, sort_keys=True)))
    return (message["role"], message.get("content") or "", tuple(calls), message.get("tool_call_id"),
            message.get("name"))


def common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    for x, y in zip(a, b):
        if _normalized(x) != _normalized(y):
            break
        n += 1
    return n


def plan_turn(stored_system: str, stored: list[dict], messages: list[dict], *, follow: bool,
              system: str | None = None) -> TurnPlan:
    """Decide keep/new/system for a turn; raises BAD_REQUEST when there is nothing to answer."""
    if not follow:
        if system is not None and system != stored_system:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "system may only be given with follow")
        plan = TurnPlan(None, list(messages), None, False)
        after = stored + plan.new
    else:
        same_system = system is None or system == stored_system
        k = common_prefix(stored, messages)
        if same_system and k == len(stored):
            plan = TurnPlan(None, list(messages[k:]), None, False)
        else:
            plan = TurnPlan(k, list(messages[k:]), None if same_system else system, True)
        after = messages
    if not after or after[-1]["role"] not in ("user", "tool"):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "the conversation must end with a user or tool message for the agent to answer"
            + (" (these messages add nothing after the agent's last reply)" if follow and not plan.new else ""),
        )
    return plan
