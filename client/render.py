"""Human rendering of agentd results for `agentctl`: plain text, no colour, pipe-friendly.

Each `render_*` function takes an op's result map (see agentd.responses) and returns text;
the CLI decides where it goes. Missing fields render as "-" rather than failing, so an
older or newer daemon still gets readable output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

DASH = "-"


def human_bytes(n: Any) -> str:
    """1536 -> '1.5 KiB'."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: Any) -> str:
    """0.0123 -> '12 ms', 75 -> '1m 15s', 90061 -> '1d 1h'."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return DASH
    s = float(seconds)
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    s = int(s)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s"


def human_ago(epoch: Any, now: float | None = None) -> str:
    """Epoch seconds -> '3m 2s ago'; None -> 'never'."""
    if epoch is None:
        return "never"
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return DASH
    delta = (time.time() if now is None else now) - float(epoch)
    if delta < 0:
        return "just now" if delta > -5 else f"in {human_duration(-delta)}"
    if delta < 1:
        return "just now"
    return f"{human_duration(delta)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain aligned table; columns in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _num(v: Any) -> str:
    return DASH if v is None else str(v)


def agents_table(agents: Any, now: float | None = None) -> str:
    if not agents:
        return "No agents."
    rows = []
    for a in agents:
        rows.append(
            [
                _get(a, "name") or DASH,
                _get(a, "role") or DASH,
                _get(a, "state") or DASH,
                _num(_get(a, "tokens")),
                human_bytes(_get(a, "bytes")),
                _num(_get(a, "messages")),
                "yes" if _get(a, "dirty") else "no",
                human_ago(_get(a, "updated_at"), now),
                human_ago(_get(a, "last_saved_at"), now),
            ]
        )
    return table(
        ["NAME", "ROLE", "STATE", "TOKENS", "SIZE", "MSGS", "DIRTY", "UPDATED", "SAVED"], rows, right=(3, 4, 5)
    )


def render_list(result: dict[str, Any], now: float | None = None) -> str:
    return agents_table(result.get("agents"), now)


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)


def render_agent(agent: Any, now: float | None = None) -> str:
    return _kv(
        [
            ("name", str(_get(agent, "name") or DASH)),
            ("role", str(_get(agent, "role") or DASH)),
            ("state", str(_get(agent, "state") or DASH)),
            ("tokens", _num(_get(agent, "tokens"))),
            ("size", human_bytes(_get(agent, "bytes"))),
            ("messages", _num(_get(agent, "messages"))),
            ("dirty", "yes" if _get(agent, "dirty") else "no"),
            ("created", human_ago(_get(agent, "created_at"), now)),
            ("updated", human_ago(_get(agent, "updated_at"), now)),
            ("saved", human_ago(_get(agent, "last_saved_at"), now)),
        ]
    )


def render_show(result: dict[str, Any], now: float | None = None) -> str:
    text = render_agent(result.get("agent"), now)
    system = result.get("system")
    if system:
        text += "\n\nsystem prompt:\n" + _indent(str(system))
    return text


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines() or [""])


def render_history(result: dict[str, Any]) -> str:
    messages = result.get("messages") or []
    if not messages:
        return "No messages."
    blocks = []
    for m in messages:
        blocks.append(f"[{_get(m, 'role') or '?'}]\n{_get(m, 'content') or ''}")
    return "\n\n".join(blocks)


def render_status(result: dict[str, Any], now: float | None = None) -> str:
    model = result.get("model") or {}
    memory = result.get("memory") or {}
    limits = result.get("limits") or {}
    flush = result.get("flush") or {}
    agents = result.get("agents") or []
    hot = sum(1 for a in agents if _get(a, "state") == "hot")
    dirty = sum(1 for a in agents if _get(a, "dirty"))

    last_flush = human_ago(_get(flush, "last_flush_at"), now)
    if _get(flush, "last_flush_at") is not None and _get(flush, "last_result"):
        last_flush += f" ({_get(flush, 'last_result')})"
    failures = _get(flush, "consecutive_failures")
    flush_line = f"every {human_duration(_get(flush, 'interval_s'))}, last {last_flush}"
    if failures:
        flush_line += f", {failures} consecutive failure(s)"
    if _get(flush, "last_error"):
        flush_line += f", last error: {_get(flush, 'last_error')}"

    pairs = [
        ("daemon", f"agentd {result.get('daemon_version', DASH)}, pid {_num(result.get('pid'))}, "
                   f"up {human_duration(result.get('uptime_s'))}"),
        ("model", f"{_get(model, 'id') or DASH} ({human_bytes(_get(model, 'bytes'))}) {_get(model, 'path') or ''}".rstrip()),
        ("memory", f"model {human_bytes(_get(memory, 'model_bytes'))}, caches {human_bytes(_get(memory, 'cache_bytes'))}, "
                   f"active {human_bytes(_get(memory, 'active_bytes'))}"),
        ("system", f"{human_bytes(_get(memory, 'system_available'))} available of "
                   f"{human_bytes(_get(memory, 'system_total'))}, pressure {_get(memory, 'pressure') or DASH}"),
        ("limits", f"max hot {_num(_get(limits, 'max_hot'))}, cache budget {human_bytes(_get(limits, 'cache_budget'))}, "
                   f"min available {human_bytes(_get(limits, 'min_available'))}"),
        ("flush", flush_line),
        ("http", (f"{_get(result.get('http'), 'base_url')} (key in {_get(result.get('http'), 'token_file')})"
                  if result.get("http") else "off")),
        ("agents", f"{len(agents)} ({hot} hot, {dirty} dirty)"),
    ]
    if store := result.get("store"):
        pairs.insert(-1, ("store", store_line(store)))
    text = _kv(pairs)
    # Not in the protocol contract yet: the daemon lists refused (quarantined) cache files.
    for problem in result.get("problems") or []:
        text += (
            f"\nproblem: {_get(problem, 'agent') or '?'}: {_get(problem, 'message') or _get(problem, 'reason') or '?'}"
            + (f" (moved to {_get(problem, 'moved_to')})" if _get(problem, "moved_to") else "")
        )
    if agents:
        text += "\n\n" + agents_table(agents, now)
    return text


def store_line(store: dict[str, Any]) -> str:
    """Blocks on disk, what sharing saves, and garbage `agentctl gc` would reclaim."""
    bits = _get(store, "kv_bits")
    return (f"{_num(_get(store, 'blocks'))} blocks ({human_bytes(_get(store, 'block_bytes'))}, "
            f"{_num(_get(store, 'block_tokens'))} tokens each, KV {f'{bits}-bit' if bits else 'unquantized'}), "
            f"shared {human_bytes(_get(store, 'shared_bytes'))} (saves {human_bytes(_get(store, 'saved_by_sharing_bytes'))}), "
            f"tails {human_bytes(_get(store, 'agent_bytes'))}, garbage {_num(_get(store, 'garbage_blocks'))} blocks "
            f"({human_bytes(_get(store, 'garbage_bytes'))})"
            + (f", {_num(_get(store, 'legacy_files'))} v1 file(s) to convert" if _get(store, "legacy_files") else ""))


def render_gc(result: dict[str, Any]) -> str:
    return (f"Removed {_num(result.get('removed_blocks'))} unused block(s), "
            f"freed {human_bytes(result.get('freed_bytes'))}.\nstore: {store_line(result.get('store') or {})}")


def render_chat_stats(result: dict[str, Any]) -> str:
    """One line for stderr after a streamed reply."""
    source = result.get("cache_source") or DASH
    parts = [
        f"{_num(result.get('generated_tokens'))} tokens",
        f"{_fmt(result.get('decode_tokens_per_s'), '{:.1f}')} tok/s",
        f"ttft {_fmt(result.get('ttft_ms'), '{:.0f}')} ms",
        f"cache {source} ({_num(result.get('cached_tokens'))} cached, "
        f"{_num(result.get('prefilled_tokens'))} prefilled, restore {_fmt(result.get('restore_ms'), '{:.0f}')} ms)",
        f"prompt {_num(result.get('prompt_tokens'))}",
    ]
    if result.get("finish_reason") == "length":
        parts.append("stopped at max tokens")
    return "[" + ", ".join(parts) + "]"


def _fmt(v: Any, spec: str) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return DASH
    return spec.format(v)


def render_ping(result: dict[str, Any], rtt_s: float) -> str:
    return f"pong from agentd pid {_num(result.get('pid'))} in {human_duration(rtt_s)}"


def render_export(result: dict[str, Any], where: str) -> str:
    tokens = result.get("cache_tokens")
    head = (f"Exported agent {result.get('name', DASH)} to {where} ({human_bytes(result.get('bytes'))}, "
            f"{_num(result.get('messages'))} messages, ")
    if isinstance(tokens, int) and tokens > 0:
        return head + f"KV cache of {_num(tokens)} tokens)."
    return head + f"no KV cache: {result.get('cache_reason') or 'none'}; an importer rebuilds it from the transcript)."


def render_import(result: dict[str, Any]) -> str:
    agent = result.get("agent") or {}
    head = f"Imported agent {agent.get('name', DASH)} ({_num(agent.get('messages'))} messages) "
    if result.get("cache_imported"):
        return head + f"with its KV cache ({_num(result.get('cache_tokens'))} tokens): its next turn continues from it."
    return (head + f"without its KV cache: {result.get('cache_reason') or 'none'}. "
            "The cache is rebuilt from the transcript on first use.")
