"""OpenAI's API shapes on one side, agentd's protocol requests and results on the other.

Pure translation (no sockets, no model): `agentd.http_server` validates a request body
with these functions, sends the protocol request they build through `Daemon.handle`, and
shapes the result (or the error) the way OpenAI's clients parse it. What is not supported
is refused with a 400 that names the field, never silently ignored; a few fields that
change nothing here (`user`, `metadata`, `store` on chat, `parallel_tool_calls`) are
accepted as OpenAI documents them and have no effect.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from . import protocol as p

AGENT_PREFIX = "agent:"
DEFAULT_MAX_TOKENS = 512


class ApiError(Exception):
    """An answer in OpenAI's error shape: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# How each protocol error code reads over HTTP: (status, type, code).
_ERRORS = {
    p.ErrorCode.BAD_REQUEST: (400, "invalid_request_error", None),
    p.ErrorCode.BAD_FRAME: (400, "invalid_request_error", None),
    p.ErrorCode.UNKNOWN_OP: (400, "invalid_request_error", None),
    p.ErrorCode.PROTOCOL_MISMATCH: (400, "invalid_request_error", None),
    p.ErrorCode.INVALID_NAME: (400, "invalid_request_error", "invalid_agent_name"),
    p.ErrorCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    p.ErrorCode.ALREADY_EXISTS: (409, "invalid_request_error", "already_exists"),
    p.ErrorCode.BUSY: (409, "invalid_request_error", "agent_busy"),
    p.ErrorCode.CANCELLED: (503, "server_error", "cancelled"),
    p.ErrorCode.SHUTTING_DOWN: (503, "server_error", "shutting_down"),
    p.ErrorCode.INTERNAL: (500, "server_error", "internal_error"),
    p.ErrorCode.MODEL_ERROR: (500, "server_error", "model_error"),
    p.ErrorCode.BAD_BUNDLE: (400, "invalid_request_error", "bad_bundle"),
    # OpenAI's own name for a prompt beyond the model's context.
    p.ErrorCode.CONTEXT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
}


def api_error(code: str, message: str) -> ApiError:
    """The HTTP form of a protocol error frame's code and message."""
    try:
        status, kind, api_code = _ERRORS[p.ErrorCode(code)]
    except (ValueError, KeyError):
        status, kind, api_code = 500, "server_error", str(code).lower()
    return ApiError(status, message, type=kind, code=api_code)


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_value" if param else None)


def _check_fields(body: Any, allowed: set[str], endpoint: str) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the body of {endpoint} must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"{endpoint} does not support field(s): {', '.join(unknown)}", unknown[0])
    return body


def _only(body: dict, field: str, allowed: tuple, what: str) -> None:
    if field in body and body[field] not in allowed:
        raise bad(f"{field}={body[field]!r} is not supported ({what})", field)


def resolve_model(model: Any, base_id: str) -> str | None:
    """The agent a `model` names (`agent:<name>`), or None for the base model."""
    if not isinstance(model, str) or not model:
        raise bad("model must be a string: the base model's id or 'agent:<name>'", "model")
    if model.startswith(AGENT_PREFIX):
        return p.validate_agent_name(model[len(AGENT_PREFIX):])
    if model != base_id:
        raise ApiError(404, f"no model {model!r}: use {base_id!r} or 'agent:<name>' (GET /v1/models lists them)",
                       param="model", code="model_not_found")
    return None


def _text(content: Any, where: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """Text content: a string, None, or a list of text parts (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}: only text content is supported, not {kind!r}", where)
            pieces.append(part["text"])
        return "".join(pieces)
    raise bad(f"{where}: content must be a string or a list of text parts", where)


def _sampling(body: dict, max_field: str) -> dict:
    """max_tokens (or max_completion_tokens / max_output_tokens), temperature, top_p, seed."""
    out = {"max_tokens": DEFAULT_MAX_TOKENS}
    for field in (max_field, "max_completion_tokens"):
        if body.get(field) is not None:
            out["max_tokens"] = body[field]
    for field in ("temperature", "top_p", "seed"):
        if body.get(field) is not None:
            out[field] = body[field]
    if body.get("stop") is not None:  # a string or a list of them, as OpenAI takes it
        out["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    return out


def _chat_tools(body: dict) -> list | None:
    _only(body, "tool_choice", (None, "auto", "none"), "agentd lets the model decide: 'auto' or 'none'")
    if body.get("tool_choice") == "none":
        return None
    return body.get("tools") or None


# --- Chat Completions ------------------------------------------------------------------

CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "tools", "tool_choice", "parallel_tool_calls", "n", "user", "metadata",
               "store", "frequency_penalty", "presence_penalty", "logprobs", "response_format"}


def chat_messages(raw: Any) -> tuple[str | None, list[dict]]:
    """(system prompt or None, the conversation) from a Chat Completions `messages` list.

    Leading system and developer messages form the system prompt; later ones are refused
    (an agent's system prompt is one string at the start of its transcript)."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    system, messages = None, []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if messages:
                raise bad(f"{where}: a {role} message is only supported before the conversation starts", where)
            text = _text(m.get("content"), where)
            system = text if system is None else system + "\n\n" + text
            continue
        unknown = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio"}
        if unknown:
            raise bad(f"{where} has unsupported field(s): {', '.join(sorted(unknown))}", where)
        msg = {"role": role, "content": _text(m.get("content"), where)}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c.get("id"), "type": c.get("type", "function"), "function": c.get("function")}
                                 for c in m["tool_calls"] if isinstance(c, dict)]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        messages.append(msg)
    if not messages:
        raise bad("messages must hold at least one user message after the system prompt", "messages")
    return system, messages


def chat_request(body: Any, base_id: str) -> tuple[str | None, dict]:
    """(agent or None, the fields of a `turn` with follow, or of a `complete`)."""
    body = _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    agent = resolve_model(body.get("model"), base_id)
    _only(body, "n", (None, 1), "one choice per request")
    _only(body, "frequency_penalty", (None, 0, 0.0), "no penalties")
    _only(body, "presence_penalty", (None, 0, 0.0), "no penalties")
    _only(body, "logprobs", (None, False), "no log probabilities")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise bad("response_format: only {'type': 'text'} is supported", "response_format")
    if not isinstance(body.get("stream_options") or {}, dict) or set(body.get("stream_options") or {}) - {
            "include_usage"}:
        raise bad("stream_options: only include_usage is supported", "stream_options")
    system, messages = chat_messages(body.get("messages"))
    fields = {"messages": messages, "tools": _chat_tools(body), **_sampling(body, "max_tokens")}
    if agent is None:
        return None, {**fields, "system": system or ""}
    return agent, {**fields, "name": agent, "follow": True, "system": system}


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["generated_tokens"],
            "total_tokens": result["prompt_tokens"] + result["generated_tokens"],
            "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]}}


def _extension(result: dict) -> dict:
    """agentd's own facts about a turn, beside OpenAI's fields (clients ignore extra keys)."""
    keys = ("cache_source", "restore_ms", "ttft_ms", "prefilled_tokens", "decode_tokens_per_s", "branch",
            "n_messages")
    return {k: result[k] for k in keys if k in result}


def chat_completion(model: str, result: dict) -> dict:
    message: dict = {"role": "assistant", "content": result["text"] if result["text"] or not result.get(
        "tool_calls") else None}
    if result.get("tool_calls"):
        message["tool_calls"] = result["tool_calls"]
    return {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": result["finish_reason"], "logprobs": None}],
            "usage": _usage(result), "agentd": _extension(result)}


class ChatChunks:
    """The `chat.completion.chunk` objects of one streamed completion, in order."""

    def __init__(self, model: str, include_usage: bool):
        self.base = {"id": _new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}
        self.include_usage = include_usage

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, piece: str) -> dict:
        return self._chunk({"content": piece})

    def last(self, result: dict) -> list[dict]:
        out = []
        if result.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(result["tool_calls"])]
            out.append(self._chunk({"tool_calls": calls}))
        out.append(self._chunk({}, result["finish_reason"]))
        if self.include_usage:
            out.append({**self.base, "choices": [], "usage": _usage(result), "agentd": _extension(result)})
        return out


# --- Responses -------------------------------------------------------------------------

RESPONSE_FIELDS = {"model", "input", "instructions", "previous_response_id", "conversation", "stream",
                   "max_output_tokens", "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls",
                   "store", "metadata", "text", "truncation", "user", "include", "reasoning", "prompt_cache_key",
                   "background", "service_tier", "stream_options"}


def response_input(raw: Any) -> list[dict]:
    """Protocol messages from a Responses `input`: a string, or message and function-call items."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("input must be a string or a non-empty list of items", "input")
    messages: list[dict] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "assistant"):
            messages.append({"role": item["role"], "content": _text(item.get("content"), where,
                                                                    ("input_text", "output_text", "text"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output"), where, ("input_text", "output_text", "text"))})
        else:
            what = item.get("role") if kind == "message" else kind
            raise bad(f"{where}: items of type {what!r} are not supported (messages of user or assistant, "
                      "function_call and function_call_output are)", where)
    return messages


def response_tools(tools: Any) -> list | None:
    """Responses tools ({type, name, parameters}) in the chat template's form."""
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise bad("tools: only function tools are supported", "tools")
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
            for t in tools]


def conversation_agent(conversation: Any) -> str | None:
    """The agent a `conversation` names: 'agent:<name>', '<name>' or {'id': ...}."""
    if conversation is None:
        return None
    cid = conversation.get("id") if isinstance(conversation, dict) else conversation
    if not isinstance(cid, str):
        raise bad("conversation must be an id string or {'id': ...}", "conversation")
    return p.validate_agent_name(cid.removeprefix(AGENT_PREFIX))


def response_request(body: Any, base_id: str) -> dict:
    """The checked parts of a Responses request: agent (from model or conversation),
    messages, system, previous id, tools, sampling and the meta kept with the result."""
    body = _check_fields(body, RESPONSE_FIELDS, "/v1/responses")
    agent = resolve_model(body.get("model"), base_id)
    named = conversation_agent(body.get("conversation"))
    if agent and named and agent != named:
        raise bad(f"model names agent {agent!r} but conversation names {named!r}", "conversation")
    _only(body, "background", (None, False), "responses are answered in the request")
    _only(body, "truncation", (None, "disabled"), "the agent keeps its whole transcript")
    _only(body, "include", (None, []), "nothing extra to include")
    if (body.get("text") or {}).get("format", {"type": "text"}) != {"type": "text"}:
        raise bad("text.format: only {'type': 'text'} is supported", "text")
    if body.get("reasoning") not in (None, {}):
        raise bad("reasoning options are not supported", "reasoning")
    _only(body, "tool_choice", (None, "auto", "none"), "agentd lets the model decide: 'auto' or 'none'")
    if body.get("previous_response_id") is not None and not isinstance(body["previous_response_id"], str):
        raise bad("previous_response_id must be a string", "previous_response_id")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise bad("instructions must be a string", "instructions")
    tools = None if body.get("tool_choice") == "none" else response_tools(body.get("tools"))
    meta = {k: body.get(k) for k in ("model", "instructions", "previous_response_id", "max_output_tokens",
                                     "temperature", "top_p", "metadata", "tools")}
    meta["conversation"] = named
    return {"agent": agent or named, "messages": response_input(body.get("input")), "system": body.get("instructions"),
            "previous": body.get("previous_response_id"), "tools": tools,
            "sampling": _sampling(body, "max_output_tokens"), "store": body.get("store", True) is not False,
            "meta": meta, "response_id": _new_id("resp_")}


def response_object(response_id: str, created_at: float, meta: dict, result: dict | None,
                    status: str = "completed") -> dict:
    """A Responses API object; `result` None gives the in-progress shell a stream starts with."""
    output, usage, incomplete = [], None, None
    if result is not None:
        if result["text"] or not result.get("tool_calls"):
            output.append({"type": "message", "id": "msg_" + response_id.removeprefix("resp_"), "status": "completed",
                           "role": "assistant",
                           "content": [{"type": "output_text", "text": result["text"], "annotations": []}]})
        for call in result.get("tool_calls") or []:
            output.append({"type": "function_call", "id": "fc_" + call["id"], "call_id": call["id"],
                           "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                           "status": "completed"})
        usage = {"input_tokens": result["prompt_tokens"],
                 "input_tokens_details": {"cached_tokens": result["cached_tokens"]},
                 "output_tokens": result["generated_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": result["prompt_tokens"] + result["generated_tokens"]}
        if result["finish_reason"] == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    obj = {"id": response_id, "object": "response", "created_at": int(created_at), "status": status,
           "model": meta.get("model"), "output": output, "usage": usage, "error": None,
           "incomplete_details": incomplete, "instructions": meta.get("instructions"),
           "previous_response_id": meta.get("previous_response_id"),
           "conversation": {"id": AGENT_PREFIX + meta["conversation"]} if meta.get("conversation") else None,
           "max_output_tokens": meta.get("max_output_tokens"), "temperature": meta.get("temperature"),
           "top_p": meta.get("top_p"), "tools": meta.get("tools") or [], "tool_choice": "auto",
           "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "truncation": "disabled",
           "metadata": meta.get("metadata") or {}, "store": True}
    if result is not None:
        obj["agentd"] = _extension(result)
    return obj


def sse(event: dict, name: str | None = None) -> bytes:
    """One server-sent event carrying `event` as JSON."""
    head = f"event: {name}\n" if name else ""
    return (head + "data: " + json.dumps(event, ensure_ascii=False) + "\n\n").encode()
