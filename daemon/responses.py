"""Responses of the agentd wire protocol: the frames the daemon sends back.

Requests, limits and error codes are in `agentd.protocol`; this module builds response
frames (the daemon) and parses them (clients). Like `agentd.protocol`, it imports neither
mlx nor anything heavy.

Responses (daemon -> client) are maps carrying the request's "id" and a "type":

    {"id", "type": "result", ...fields}           terminal
    {"id", "type": "token", "text": str}          chat only, zero or more before the result
    {"id", "type": "progress", "done": int, "total": int}
                                                  chat only: prompt tokens prefilled so far
    {"id", "type": "chunk", "data": bytes}        export only: the bundle's next bytes
                                                  (at most MAX_CHUNK_BYTES each), in order
    {"id", "type": "error", "code": str, "message": str}   terminal; code is an ErrorCode

A frame the daemon could not parse, or whose id it could not read, gets an error with
"id": None.

Result fields per op:

    hello     protocol, daemon_version, model_id, pid
              (a protocol mismatch is an error PROTOCOL_MISMATCH instead)
    ping      pong: True, pid
    status    pid, uptime_s, daemon_version,
              model  {id, path, bytes},
              memory {model_bytes, cache_bytes, active_bytes, system_available,
                      system_total, pressure: str, restore_reserve (CUDA and the
                      CPU: {agents, bytes, seconds} made ready at start, else null)},
              limits {max_hot, cache_budget, min_available},
              flush  {interval_s, last_flush_at, last_result, last_error,
                      consecutive_failures},
              store  {blocks, block_bytes, shared_blocks, shared_bytes,
                      saved_by_sharing_bytes, agent_bytes, garbage_blocks,
                      garbage_bytes, legacy_files, block_tokens, kv_bits},
              scheduler {turns_in_flight, batched_steps (decode passes that carried
                      several turns), max_batch, clients (greeted socket connections)},
              problems [{agent, reason, message, moved_to, at}]   (refused cache files)
              http   {address, base_url, token_file} | None   (the HTTP front end)
              agents [AgentInfo]
    create    agent: AgentInfo
    fork      agent: AgentInfo
    list      agents: [AgentInfo]
    show      agent: AgentInfo, system: str
    history   messages: [{role, content}]
    delete    deleted: name
    reset     agent: AgentInfo
    chat      text, cached_tokens, prefilled_tokens, generated_tokens, prompt_tokens,
              cache_source ("memory"|"disk"|"rebuilt"|"new"), restore_ms, ttft_ms,
              decode_tokens_per_s, finish_reason ("stop"|"length")
    turn      as chat, finish_reason also "tool_calls", plus tool_calls: [ToolCall] | None,
              branch: str | None (the agent a replaced transcript was kept as),
              n_messages (the transcript's length after the turn)
    complete  as chat (cache_source "memory"|"new"), plus tool_calls
    response  response_id, agent: str | None, created_at, n_messages, body: {meta, result, ...}
    save      saved: [name]
    evict     evicted: name, was_dirty: bool
    gc        removed_blocks: int, freed_bytes: int, store {...as in status}
    export    name, bytes (the bundle's size), sha256 (of the whole bundle, hex),
              messages, cache_tokens (0: no cache inside), cache_reason (why not, or None)
    import    agent: AgentInfo, bytes, sha256, cache_imported: bool, cache_tokens,
              cache_reason (why the cache was not imported, or None)
    shutdown  stopping: True

    AgentInfo {name, role, state ("hot"|"cold"), tokens, bytes, dirty: bool,
               messages: int, created_at, updated_at, last_saved_at}
               (times are float epoch seconds; last_saved_at may be None)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from .protocol import ErrorCode, ProtocolError

RESULT = "result"
TOKEN = "token"
ERROR = "error"
PROGRESS = "progress"
CHUNK = "chunk"


def result(request_id: int, **fields: Any) -> dict[str, Any]:
    """A terminal success frame for `request_id` with the op's result fields."""
    if "id" in fields or "type" in fields:
        raise ValueError("result fields must not include 'id' or 'type'")
    return {"id": request_id, "type": RESULT, **fields}


def token(request_id: int, text: str) -> dict[str, Any]:
    """A non-terminal chat stream frame carrying generated text."""
    return {"id": request_id, "type": TOKEN, "text": text}


def progress(request_id: int, done: int, total: int) -> dict[str, Any]:
    """A non-terminal chat frame: `done` of `total` prompt tokens prefilled."""
    return {"id": request_id, "type": PROGRESS, "done": done, "total": total}


def chunk(request_id: int, data: bytes | memoryview) -> dict[str, Any]:
    """A non-terminal export frame carrying the next bytes of the bundle."""
    return {"id": request_id, "type": CHUNK, "data": data}


def error(request_id: int | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    """A terminal error frame; `request_id` is None when the request's id was unreadable."""
    return {"id": request_id, "type": ERROR, "code": ErrorCode(code).value, "message": str(message)}


@dataclass(frozen=True)
class Result:
    id: int | None
    fields: dict[str, Any]


@dataclass(frozen=True)
class Token:
    id: int | None
    text: str


@dataclass(frozen=True)
class Progress:
    id: int | None
    done: int
    total: int


@dataclass(frozen=True)
class Chunk:
    id: int | None
    data: bytes


@dataclass(frozen=True)
class Error:
    id: int | None
    code: str  # an ErrorCode value, or an unknown code from a newer daemon
    message: str


Response = Result | Token | Progress | Chunk | Error


def response_from_wire(wire: Any) -> Response:
    """Parse a decoded daemon frame; a malformed one raises ProtocolError(BAD_FRAME)."""
    if not isinstance(wire, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"response is a {type(wire).__name__}, not a map")
    rid = wire.get("id")
    if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "response id is not an integer")
    kind = wire.get("type")
    if kind == RESULT:
        return Result(rid, {k: v for k, v in wire.items() if k not in ("id", "type")})
    if kind == TOKEN:
        text = wire.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.BAD_FRAME, "token frame without a text string")
        return Token(rid, text)
    if kind == PROGRESS:
        done, total = wire.get("done"), wire.get("total")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (done, total)):
            raise ProtocolError(ErrorCode.BAD_FRAME, "progress frame without done and total integers")
        return Progress(rid, done, total)
    if kind == CHUNK:
        data = wire.get("data")
        if not isinstance(data, bytes):
            raise ProtocolError(ErrorCode.BAD_FRAME, "chunk frame without data bytes")
        return Chunk(rid, data)
    if kind == ERROR:
        code, message = wire.get("code"), wire.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError(ErrorCode.BAD_FRAME, "error frame without code and message strings")
        return Error(rid, code, message)
    raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown response type {kind!r}")


# --- result values: the daemon builds these, `to_wire()` gives the frame's fields -------

# Where a turn's cache came from: already in memory, loaded from its file, re-prefilled
# from the transcript (no usable file, or a window that could not be rewound), or a new
# agent with no conversation yet.
CacheSource = Literal["memory", "disk", "rebuilt", "new"]
CACHE_SOURCES: tuple[str, ...] = get_args(CacheSource)

# Why a turn ended: the model's end token or a stop string, the max_tokens limit, or the
# client went away / the daemon is stopping ("cancelled" never reaches a client as a
# result: it becomes a CANCELLED error frame).
FinishReason = Literal["stop", "length", "cancelled"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)

AgentState = Literal["hot", "cold"]


@dataclass(frozen=True)
class AgentInfo:
    name: str
    role: str
    state: AgentState
    tokens: int
    bytes: int
    dirty: bool
    messages: int
    created_at: float
    updated_at: float
    last_saved_at: float | None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChatResult:
    text: str
    cache_source: CacheSource
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prompt_tokens: int
    restore_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    finish_reason: FinishReason

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:  # the name library callers used before to_wire
        return self.to_wire()
