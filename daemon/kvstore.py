"""The per-agent files of the block store: KV settings, manifests and tails.

```
caches/blocks/<id>.kvb                 full blocks, content-addressed, shared (blocks.py)
caches/agents/<name>/manifest.json     the agent: record copy, token ids, block ids, tail, window
caches/agents/<name>/tail.<gen>.kvt    rows after the last full block, appended segment by segment
caches/agents/<name>/window.<gen>.safetensors   sliding-window layers, verbatim (Gemma 3)
caches/<name>.safetensors              a format v1 file: loaded once, then converted
```

A tail file only grows while a manifest names it: each save appends the new rows past the
last byte the durable manifest names (so a crash never touches named bytes) and the next
manifest lists the segment with its xxh3-128. A tail starts at a block boundary, and its
segments are a block file's rows (blocks.py): when a turn crosses the boundary, the rows
up to it are appended, then the block's trailer, and the file is hard-linked as the block;
the rows past the boundary start the next generation's tail. A tail that does not
continue (the cache was trimmed into it) is written whole under the next generation's
name. The manifest is checked with SHA-256 (it is small).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import full_fsync
from .records import EXTRA_KEYS, AgentRecord
from .kvrows import RowsError, Segment, read_segment, row_buffers, segment_digest, write_buffers
from .restore_arrays import RowTarget

FORMAT = "agentd-kv"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class KVSettings:
    """How KV is stored: `bits` None (the model's dtype) or 8/4 (mlx-lm QuantizedKVCache)."""

    bits: int | None = None
    group_size: int = 64
    block_tokens: int = 256

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size if self.bits else None,
                "block_tokens": self.block_tokens}


def cache_fingerprint(model: str, dtype: str, kv: KVSettings) -> str:
    """What a block's rows depend on besides the tokens: model, dtype and the KV setting."""
    key = json.dumps({"model": model, "dtype": dtype, **kv.to_json()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def manifest_digest(m: dict) -> str:
    body = json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


class ManifestError(ValueError):
    """A manifest that must not be used; `reason`: corrupt, checksum, version, agent."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_manifest(data: bytes, name: str) -> dict:
    """A manifest whose checksum holds and that is this agent's, or ManifestError."""
    try:
        m = json.loads(data)
    except ValueError:
        raise ManifestError("corrupt", f"{name}: manifest is not JSON (torn or damaged)") from None
    if not isinstance(m, dict) or m.get("checksum") != manifest_digest(m):
        raise ManifestError("checksum", f"{name}: manifest checksum mismatch (the file is corrupt)")
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise ManifestError("version", f"{name}: manifest format {m.get('format')} v{m.get('version')}, "
                                       f"this agentd reads v{FORMAT_VERSION}")
    if m.get("agent") != name:
        raise ManifestError("agent", f"{name}: the manifest in this folder is agent {m.get('agent')!r}'s")
    return m


def encode_manifest(m: dict) -> bytes:
    m["checksum"] = manifest_digest(m)
    return json.dumps(m, separators=(",", ":")).encode()


def write_file(replace: Callable, path: Path, buffers: list) -> int:
    """A new file from buffers, durably (temp, fsync, rename, fsync dir). Returns its size."""
    written = [0]

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)  # atomic_replace created it
        try:
            written[0] = write_buffers(fd, buffers)
        finally:
            os.close(fd)

    replace(path, write)
    return written[0]


def _segment(at: int, count: int, offset: int, size: int, rows) -> list:
    return [at, count, offset, size, segment_digest(rows, at, count)]


def durable_tail(adir: Path, prev: dict | None, tokens: list[int], fingerprint: str) -> dict | None:
    """The durable manifest's tail if its rows are rows of this cache (the tokens agree up
    to its end) and its file may be appended to; with `end`, the token after its last row."""
    pt = prev and prev.get("tail")
    if not pt or prev["fingerprint"] != fingerprint:
        return None
    end = pt["start"] + sum(seg[1] for seg in pt["segments"])
    if end > len(tokens) or prev["tokens"][:end] != tokens[:end]:  # a row depends on every token before it
        return None
    try:
        links = os.stat(adir / pt["file"], follow_symlinks=False).st_nlink
    except OSError:
        return None
    if links != 1:
        return None  # also a block (a save failed after linking it): never written again
    return {"file": pt["file"], "start": pt["start"], "segments": [list(s) for s in pt["segments"]], "end": end}


def append_rows(path: Path, tail: dict, views, hi: int) -> int:
    """Append rows `[tail end, hi)` to the tail file as a segment, past every byte the
    durable manifest names, and fsync; `tail` (from `durable_tail`) gains the segment."""
    lo = tail["end"]
    rows = row_buffers(views, lo, hi)
    last = tail["segments"][-1]
    offset = last[2] + last[3]
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        wrote = write_buffers(fd, rows, offset)
        full_fsync(fd)
    finally:
        os.close(fd)
    tail["segments"].append(_segment(lo, hi - lo, offset, wrote, rows))
    tail["end"] = hi
    return wrote


def save_tail(replace: Callable, adir: Path, cont: dict | None, tokens: list[int], start: int, views,
              gen: int) -> tuple[dict | None, int]:
    """Rows [start, len(tokens)) in the tail: appended to `cont` (the `durable_tail`) when it
    starts there too, else a new file. Returns the manifest's `tail` entry and the bytes written."""
    n = len(tokens)
    if n == start:
        return None, 0
    if cont and cont["start"] == start:
        wrote = append_rows(adir / cont["file"], cont, views, n) if cont["end"] < n else 0
        return {"file": cont["file"], "start": start, "segments": cont["segments"]}, wrote
    rows = row_buffers(views, start, n)
    tfile = f"tail.{gen}.kvt"
    wrote = write_file(replace, adir / tfile, rows)
    return {"file": tfile, "start": start, "segments": [_segment(start, n - start, 0, wrote, rows)]}, wrote


def open_tail(path: Path, tail: dict) -> tuple[int, list[Segment]] | None:
    """The tail file open (the caller closes it) and its segments as the manifest names
    them, or None if it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    return fd, [Segment(fd, at, count, offset, checksum, f"{at}:{count}".encode())
                for at, count, offset, _size, checksum in tail["segments"]]


def read_tail(path: Path, tail: dict, target: RowTarget, good: int) -> tuple[int, str | None]:
    """Fill `target` from the tail's segments in order. Returns how far the cache is now
    good and, if a segment was refused, why (`truncated`, `checksum`, `unreadable`, `missing`)."""
    opened = open_tail(path, tail)
    if opened is None:
        return good, "missing"
    fd, segments = opened
    try:
        for seg in segments:
            try:
                target.fill(seg.at, seg.at + seg.count, lambda rows, seg=seg: read_segment(seg, rows))
            except RowsError as e:
                return seg.at, str(e)
            good = seg.at + seg.count
    finally:
        os.close(fd)
    return good, None


def summarize(manifests: dict[str, dict], sizes: dict[str, int], agent_dir: Callable[[str], Path]):
    """Per agent (tokens, bytes it references, saved_at), and the store's block accounting:
    blocks on disk, those named by more than one agent, what sharing saves, garbage."""
    refs: dict[str, int] = {}
    info, own_total = {}, 0
    for name, m in manifests.items():
        own = 0
        for part in (m["tail"], m["window"]):
            with contextlib.suppress(OSError):
                own += (agent_dir(name) / part["file"]).stat().st_size if part else 0
        for b in m["blocks"]:
            refs[b] = refs.get(b, 0) + 1
        own_total += own
        info[name] = (m["n_tokens"], own + sum(sizes.get(b, 0) for b in m["blocks"]), m["saved_at"])
    named = {b: r for b, r in refs.items() if b in sizes}
    return info, {
        "blocks": len(sizes),
        "block_bytes": sum(sizes.values()),
        "shared_blocks": sum(1 for r in named.values() if r > 1),
        "shared_bytes": sum(sizes[b] for b, r in named.items() if r > 1),
        "saved_by_sharing_bytes": sum(sizes[b] * (r - 1) for b, r in named.items()),
        "agent_bytes": own_total,
        "garbage_blocks": sum(1 for b in sizes if b not in refs),
        "garbage_bytes": sum(s for b, s in sizes.items() if b not in refs),
    }


def record_to_json(rec: AgentRecord) -> str:
    """A copy of the record inside the manifest, so a lost database can be recovered."""
    return json.dumps(
        {
            "name": rec.name,
            "role": rec.role,
            "system": rec.system,
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
            "messages": rec.messages,
        }
    )


def record_from_json(text: str | None, name: str) -> AgentRecord:
    """The inverse of record_to_json, checked: the copy must be of this agent and well-formed."""
    if text is None:
        raise ValueError("the file carries no record")
    d = json.loads(text)
    if d["name"] != name:
        raise ValueError(f"the record inside is agent {d['name']!r}'s")
    messages = [{k: m[k] for k in ("role", "content", *EXTRA_KEYS) if k in m} for m in d["messages"]]
    if not all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages):
        raise TypeError("messages must be role and content strings")
    if not isinstance(d["role"], str) or not isinstance(d["system"], str):
        raise TypeError("role and system must be strings")
    created, updated = float(d["created_at"]), float(d["updated_at"])
    return AgentRecord(name, d["role"], d["system"], created, updated, updated, len(messages), messages)
