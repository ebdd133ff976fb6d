"""Checks of what a client sends, shared by every request in `agentd.protocol`: the error
codes and `ProtocolError`, agent names, field types and ranges, and turn messages. Each check
returns the value or raises ProtocolError (BAD_REQUEST or INVALID_NAME). No mlx.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any

MAX_NAME_CHARS = 64
MAX_TEXT_BYTES = 1024 * 1024  # message and system prompt, UTF-8 encoded
MAX_TURN_BYTES = 8 * 1024 * 1024  # all text of one turn's messages and tools
MAX_TURN_MESSAGES = 10_000
MAX_RESPONSE_ID_CHARS = 100
MESSAGE_ROLES = ("user", "assistant", "tool")


class ErrorCode(str, Enum):
    """Error codes carried by `{"type": "error"}` frames; the wire value is the name."""

    BAD_FRAME = "BAD_FRAME"  # not a msgpack map, too large, truncated
    BAD_REQUEST = "BAD_REQUEST"  # missing/unknown field, wrong type or range
    UNKNOWN_OP = "UNKNOWN_OP"
    PROTOCOL_MISMATCH = "PROTOCOL_MISMATCH"  # hello with another protocol, or no hello
    INVALID_NAME = "INVALID_NAME"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    BUSY = "BUSY"  # the agent has a request in flight, or the daemon is at capacity
    CANCELLED = "CANCELLED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"
    MODEL_ERROR = "MODEL_ERROR"
    BAD_BUNDLE = "BAD_BUNDLE"  # an imported agent bundle that is refused (truncated, corrupt, ...)
    PERMISSION_DENIED = "PERMISSION_DENIED"  # the peer is another user (agentd serves only its own)
    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"  # the conversation no longer fits the model's context


class ProtocolError(Exception):
    """A message that breaks the protocol. `request_id` is set when the id was readable."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def validate_agent_name(name: Any) -> str:
    """Return `name` if it is a valid agent name, else raise ProtocolError(INVALID_NAME).

    Names become file names, so only 1..64 ASCII letters, digits, "-", "_", "." are
    allowed, and not a leading "." (which excludes ".", "..", hidden files and agentd's
    `.tmp-` temp files) nor a leading "-" (which `agentctl` would take for an option).
    """
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.INVALID_NAME, f"agent name must be a string, not {type(name).__name__}")
    if not name:
        raise ProtocolError(ErrorCode.INVALID_NAME, "agent name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ProtocolError(
            ErrorCode.INVALID_NAME, f"agent name is {len(name)} characters; the limit is {MAX_NAME_CHARS}"
        )
    if name.startswith("."):
        raise ProtocolError(ErrorCode.INVALID_NAME, f"agent name {name!r} must not start with '.'")
    if name.startswith("-"):
        raise ProtocolError(
            ErrorCode.INVALID_NAME, f"agent name {name!r} must not start with '-' (agentctl would read it as an option)"
        )
    if not _NAME_RE.fullmatch(name):
        raise ProtocolError(
            ErrorCode.INVALID_NAME,
            f"agent name {name!r} may only contain letters, digits, '-', '_' and '.'",
        )
    return name


# --- field checks (raise BAD_REQUEST) -------------------------------------------------


def bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def check_int(field: str, value: Any, lo: int, hi: int) -> int:
    # bool is an int subclass; True must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(f"{field} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad(f"{field} must be between {lo} and {hi}, got {value}")
    return value


def check_float(field: str, value: Any, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(f"{field} must be a number, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not lo <= value <= hi:
        raise bad(f"{field} must be between {lo:g} and {hi:g}, got {value}")
    return value


def check_str(field: str, value: Any, *, max_chars: int | None = None, max_bytes: int | None = None) -> str:
    if not isinstance(value, str):
        raise bad(f"{field} must be a string, not {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise bad(f"{field} is {len(value)} characters; the limit is {max_chars}")
    try:
        # Also rejects lone surrogates, which msgpack could not encode.
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad(f"{field} is not valid Unicode text") from None
    if max_bytes is not None and size > max_bytes:
        raise bad(f"{field} is {size} bytes; the limit is {max_bytes}")
    return value


def check_tool_calls(field: str, calls: Any) -> None:
    if not isinstance(calls, list):
        raise bad(f"{field} must be a list")
    for i, call in enumerate(calls):
        where = f"{field}[{i}]"
        if not isinstance(call, dict) or set(call) - {"id", "type", "function"}:
            raise bad(f"{where} must be a map of id, type and function")
        check_str(f"{where}.id", call.get("id"), max_chars=200)
        if call.get("type", "function") != "function":
            raise bad(f"{where}.type must be 'function'")
        fn = call.get("function")
        if not isinstance(fn, dict) or set(fn) != {"name", "arguments"}:
            raise bad(f"{where}.function must be a map of name and arguments")
        check_str(f"{where}.function.name", fn["name"], max_chars=200)
        check_str(f"{where}.function.arguments", fn["arguments"], max_bytes=MAX_TEXT_BYTES)


def check_messages(messages: Any) -> int:
    """Validate a turn's messages (see Message above); returns the bytes of text they hold."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list")
    if len(messages) > MAX_TURN_MESSAGES:
        raise bad(f"{len(messages)} messages; the limit is {MAX_TURN_MESSAGES}")
    total = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be a map")
        extra = set(m) - {"role", "content", "tool_calls", "tool_call_id", "name"}
        if extra:
            raise bad(f"{where} has unknown field(s): {', '.join(sorted(map(repr, extra)))}")
        if m.get("role") not in MESSAGE_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, not {m.get('role')!r}")
        total += len(check_str(f"{where}.content", m.get("content"), max_bytes=MAX_TEXT_BYTES).encode())
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise bad(f"{where}: only assistant messages carry tool_calls")
            check_tool_calls(f"{where}.tool_calls", m["tool_calls"])
            total += sum(len(c["function"]["arguments"]) for c in m["tool_calls"])
        if m.get("tool_call_id") is not None:
            check_str(f"{where}.tool_call_id", m["tool_call_id"], max_chars=200)
        if m.get("name") is not None:
            check_str(f"{where}.name", m["name"], max_chars=200)
    if total > MAX_TURN_BYTES:
        raise bad(f"the messages hold {total} bytes of text; the limit is {MAX_TURN_BYTES}")
    return total


def check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise bad("tools must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        check_str(f"tools[{i}].function.name", fn.get("name"), max_chars=200)


def check_response_ref(ref: Any) -> None:
    if not isinstance(ref, dict) or set(ref) != {"id", "meta"} or not isinstance(ref["meta"], dict):
        raise bad("response must be a map of id and meta")
    check_str("response.id", ref["id"], max_chars=MAX_RESPONSE_ID_CHARS)
