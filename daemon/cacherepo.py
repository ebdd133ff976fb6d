"""The cache repository: where agents' KV caches live on disk, and what happens to files
that cannot be trusted.

Interface (what the rest of the daemon uses; the storage behind it may change):

    save(name, cache, tokens, record) -> bool   False: this cache class cannot be stored
    load(name) -> LoadedCache | Refusal | None   None: no file; Refusal: moved to quarantine
    delete(name)                                 durable (directory fsynced)
    info(name) -> ColdInfo                       tokens, bytes, saved_at without loading
    recover_records(records)                     agents whose record was lost come back
    problems                                     the last refused files, for status

Runs on the MLX thread except `info`, which only reads file headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_replace, fsync_dir, is_temp
from .cachefile import (
    CacheFileError,
    Expectation,
    LoadedCache,
    UnsupportedCache,
    load_cache,
    read_header,
    read_verified_header,
    save_cache,
)
from .protocol import ProtocolError, validate_agent_name
from .records import EXTRA_KEYS, AgentRecord, Records

log = logging.getLogger("agentd.cacherepo")

CACHE_SUFFIX = ".safetensors"
MAX_PROBLEMS = 20


@dataclass
class CacheProblem:
    """A cache file that was refused: shown in status, kept in quarantine for inspection."""

    agent: str
    reason: str
    message: str
    moved_to: str
    at: float


@dataclass(frozen=True)
class Refusal:
    """A file that exists but was not loaded (corrupt, another model, ...); already quarantined."""

    reason: str
    message: str


@dataclass(frozen=True)
class ColdInfo:
    tokens: int = 0
    bytes: int = 0
    saved_at: float | None = None


class CacheRepository:
    def __init__(self, caches_dir: Path, expect: Expectation, *, replace: Callable = atomic_replace):
        self.dir = Path(caches_dir)
        self.quarantine_dir = self.dir / "quarantine"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.expect = expect
        self.replace = replace  # the durable-write seam (fault tests swap it)
        self.problems: list[CacheProblem] = []
        self._remove_temp_files()

    def path(self, name: str) -> Path:
        return self.dir / (validate_agent_name(name) + CACHE_SUFFIX)

    def save(self, name: str, cache: list, tokens: list[int], record: AgentRecord) -> bool:
        """Write the cache durably, with a copy of the record. False: the cache class cannot be
        stored (nothing is lost: the transcript rebuilds it). OSError propagates (disk full)."""
        try:
            save_cache(
                self.path(name),
                cache,
                tokens,
                self.expect,
                agent=name,
                extra_meta={"agentd.record": record_to_json(record)},
                replace=self.replace,
            )
        except UnsupportedCache as e:
            log.warning("agent %s: cache not saved: %s", name, e)
            return False
        return True

    def load(self, name: str) -> LoadedCache | Refusal | None:
        """The verified cache, or a Refusal (the file was moved to quarantine), or None."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return load_cache(path, self.expect)
        except CacheFileError as e:
            self._quarantine(name, path, e)
            return Refusal(e.reason, str(e))

    def saved_at(self, name: str) -> float | None:
        with contextlib.suppress(OSError):
            return self.path(name).stat().st_mtime
        return None

    def delete(self, name: str) -> bool:
        """Remove the agent's file durably. Returns whether there was one; an OSError (a
        read-only home) propagates with nothing changed."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.dir)
        return True

    def info(self, name: str) -> ColdInfo:
        """What the file says without loading it; zeros when there is none or it is unreadable."""
        path = self.dir / (name + CACHE_SUFFIX)
        with contextlib.suppress(OSError, CacheFileError, ValueError):
            st = path.stat()
            size, saved = st.st_size, st.st_mtime
            try:
                tokens = int(read_header(path).get("agentd.n_tokens", 0))
            except (CacheFileError, ValueError):
                tokens = 0
            return ColdInfo(tokens, size, saved)
        return ColdInfo()

    # ---- housekeeping -------------------------------------------------------------

    def _quarantine(self, name: str, path: Path, err: CacheFileError) -> None:
        """Move a refused file aside (never delete what a user may want to inspect)."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"{name}.{int(time.time() * 1000)}.{err.reason}{CACHE_SUFFIX}"
        try:
            os.replace(path, dest)
        except OSError as e:
            log.error("agent %s: cannot move refused cache aside: %s", name, e)
            dest = path
        log.warning("agent %s: cache refused (%s), rebuilding from its transcript: %s", name, err.reason, err)
        self.problems.append(CacheProblem(name, err.reason, str(err), str(dest), time.time()))
        del self.problems[:-MAX_PROBLEMS]

    def _remove_temp_files(self) -> None:
        """Temp files of writes a crash interrupted: never loaded, removed at start."""
        for p in self.dir.iterdir():
            if is_temp(p):
                with contextlib.suppress(OSError):
                    p.unlink()
                log.info("removed an interrupted write: %s", p.name)

    def recover_records(self, records: Records) -> None:
        """Cache files without a record (agents.db was lost or replaced): every file carries
        a copy of its agent's record as of its last save, so the agent comes back with the
        conversation up to that save instead of being silently dropped."""
        for path in sorted(self.dir.glob("*" + CACHE_SUFFIX)):
            name = path.name[: -len(CACHE_SUFFIX)]
            if not path.is_file() or is_temp(path):
                continue
            try:
                validate_agent_name(name)
            except ProtocolError:
                log.warning("ignoring %s: not the name of an agent's cache file", path.name)
                continue
            if records.exists(name):
                continue
            try:
                rec = record_from_json(read_verified_header(path).get("agentd.record"), name)
            except CacheFileError as e:
                self._quarantine(name, path, e)
                continue
            except (ValueError, KeyError, TypeError) as e:
                self._quarantine(name, path, CacheFileError("record", f"{path.name}: no usable record copy ({e})"))
                continue
            records.restore(rec)
            log.warning("agent %s: its record was missing; recovered %d message(s) from its cache file",
                        name, len(rec.messages))


def record_to_json(rec: AgentRecord) -> str:
    """A copy of the record inside the cache file, so a lost database can be recovered."""
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
