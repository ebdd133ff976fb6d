"""The read-only status page at `/`: the `status` result as one self-contained HTML page.

No script, no external resource (the route sends a CSP that forbids both); it refreshes
itself every few seconds. Every value is escaped: agent names and error text come from users.
"""

from __future__ import annotations

import html
import time

REFRESH_S = 5

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.5em 0 .4em; }
table { border-collapse: collapse; background: #fff; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.hot { color: #b35900; font-weight: 600; } .cold { color: #36c; }
.normal { color: #2a2; } .warning, .low { color: #c80; } .critical { color: #c22; font-weight: 600; }
.muted { color: #777; } dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #555; } dd { margin: 0; }
"""


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def render_status_page(status: dict, now: float | None = None) -> str:
    """The page for one `status` result (see `agentd.responses`)."""
    now = time.time() if now is None else now
    mem, flush, model = status["memory"], status["flush"], status["model"]
    rows = []
    for a in status["agents"]:
        rows.append(
            f'<tr id="agent-{_e(a["name"])}"><td>{_e(a["name"])}</td><td>{_e(a["role"])}</td>'
            f'<td class="{_e(a["state"])}">{_e(a["state"])}</td><td class="num">{a["tokens"]}</td>'
            f'<td class="num">{_e(_bytes(a["bytes"]))}</td><td class="num">{a["messages"]}</td>'
            f'<td>{"unsaved" if a["dirty"] else "saved"}</td><td>{_e(_ago(a["last_saved_at"], now))}</td></tr>')
    agents = ("<table><thead><tr><th>agent</th><th>role</th><th>state</th><th>tokens</th><th>bytes</th>"
              "<th>messages</th><th>cache</th><th>last saved</th></tr></thead><tbody>" + "".join(rows)
              + "</tbody></table>") if rows else '<p class="muted">No agents yet.</p>'
    problems = status.get("problems") or []
    quarantine = ("<table><thead><tr><th>agent</th><th>reason</th><th>moved to</th><th>when</th></tr></thead><tbody>"
                  + "".join(f'<tr><td>{_e(q["agent"])}</td><td title="{_e(q["message"])}">{_e(q["reason"])}</td>'
                            f'<td>{_e(q["moved_to"])}</td><td>{_e(_ago(q["at"], now))}</td></tr>' for q in problems)
                  + "</tbody></table>") if problems else '<p class="muted">None: every cache file loaded was sound.</p>'
    hot = sum(1 for a in status["agents"] if a["state"] == "hot")
    http = status.get("http") or {}
    flush_line = (f'{_e(flush["last_result"])}, {_e(_ago(flush["last_flush_at"], now))}' if flush["last_flush_at"]
                  else "not yet")
    if flush.get("last_error"):
        flush_line += f' <span class="critical">({_e(flush["last_error"])})</span>'
    body = f"""
<h1>agentd</h1>
<p class="muted">version {_e(status["daemon_version"])}, pid {status["pid"]}, up {_e(_ago(now - status["uptime_s"], now).removesuffix(" ago"))};
this page refreshes every {REFRESH_S} s.</p>
<dl>
<dt>model</dt><dd>{_e(model["id"])} ({_e(_bytes(model["bytes"]))}, {_e(model.get("dtype", ""))}, {_e(model.get("device", ""))})</dd>
<dt>memory pressure</dt><dd id="pressure" class="{_e(mem["pressure"])}">{_e(mem["pressure"])}</dd>
<dt>KV caches in memory</dt><dd>{_e(_bytes(mem["cache_bytes"]))} in {hot} hot agent(s) of {len(status["agents"])}</dd>
<dt>system memory</dt><dd>{_e(_bytes(mem["system_available"]))} available of {_e(_bytes(mem["system_total"]))}</dd>
<dt>last flush</dt><dd id="flush">{flush_line}</dd>
<dt>OpenAI base URL</dt><dd>{_e(http.get("base_url", "off"))}</dd>
</dl>
<h2>Agents</h2>
{agents}
<h2>Quarantined cache files</h2>
{quarantine}
"""
    return _page("agentd status", body, refresh=True)


def render_login_needed() -> str:
    body = ("<h1>agentd</h1><p>This page needs the daemon's key. Run <code>agentctl open</code> to open it "
            "signed in, or send <code>Authorization: Bearer &lt;key&gt;</code>.</p>")
    return _page("agentd: key needed", body, refresh=False)
