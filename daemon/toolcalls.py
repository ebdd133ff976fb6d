"""Tool calls in generated text: held back from the stream, parsed into OpenAI's shape.

Models that call tools write the call between markers (`<tool_call>...</tool_call>` and
kin); mlx-lm's tokenizer wrapper knows each model's markers and parser. The reply streams
as usual until a start marker appears; from there the text is a call, not something to
show, and comes back as a parsed `tool_calls` entry at the end of the turn.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Callable

log = logging.getLogger("agentd.toolcalls")


class ToolCallText:
    """Feed it the reply piece by piece; it passes on what is plain text at once and keeps
    tool-call segments (and a possible marker's beginning) until it can tell."""

    def __init__(self, start: str, end: str, parser: Callable[[str, Any], Any], tools: list | None):
        self.start, self.end, self._parse, self._tools = start, end, parser, tools
        self._pending = ""  # text not yet passed on: maybe the start of a marker
        self._in_call = False
        self._call = ""
        self.text = ""  # the reply without its tool calls
        self.raw_calls: list[str] = []

    def feed(self, piece: str) -> str:
        """The part of `piece` (with what was held back) that can be shown now."""
        out = []
        data = self._pending + piece
        self._pending = ""
        while data:
            if self._in_call:
                i = data.find(self.end)
                if i < 0:
                    self._call += data
                    return "".join(out)
                self.raw_calls.append(self._call + data[:i])
                self._call, self._in_call, data = "", False, data[i + len(self.end):]
                continue
            i = data.find(self.start)
            if i >= 0:
                out.append(data[:i])
                self._in_call, data = True, data[i + len(self.start):]
                continue
            # Hold back a tail that could be the first characters of a start marker.
            hold = next((n for n in range(min(len(self.start) - 1, len(data)), 0, -1)
                         if self.start.startswith(data[-n:])), 0)
            out.append(data[: len(data) - hold])
            self._pending = data[len(data) - hold:]
            break
        shown = "".join(out)
        self.text += shown
        return shown

    def finish(self) -> tuple[str, list[dict]]:
        """(the held-back tail to show now, OpenAI tool_calls) once the reply is complete;
        `text` is then the whole reply without its calls. A call cut off by max_tokens is
        parsed as far as it got, and dropped with a log line if it cannot be."""
        tail = self._pending
        self._pending = ""
        self.text += tail
        if self._in_call and self._call.strip():
            self.raw_calls.append(self._call)
        calls = []
        for raw in self.raw_calls:
            try:
                parsed = self._parse(raw, self._tools)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("dropped a tool call that does not parse (%s: %s)", type(e).__name__, e)
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                args = call.get("arguments", {})
                calls.append({
                    "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": str(call.get("name", "")),
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)},
                })
        return tail, calls


def splitter_for(tokenizer, tools: list | None) -> ToolCallText | None:
    """A splitter when the request offers tools and the model has a tool-call format."""
    if not tools or not getattr(tokenizer, "has_tool_calling", False):
        return None
    return ToolCallText(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, tools)
