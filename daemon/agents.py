"""Persistent agents: records in SQLite, KV caches hot in memory or cold on disk.

`AgentStore` is the library form of agentd: no sockets, no threads of its own. Every
method that touches MLX must be called from one thread (the daemon's worker); `snapshot`
and the record reads are safe from any thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .atomic import atomic_replace, fsync_dir, is_temp
from .cachefile import (
    CacheFileError,
    Expectation,
    UnsupportedCache,
    cache_nbytes,
    load_cache,
    read_header,
    read_verified_header,
    save_cache,
)
from .engine import ContextTooLong, Engine
from .protocol import ProtocolError, validate_agent_name
from .records import AgentRecord, NotFound, Records

log = logging.getLogger("agentd.agents")

CACHE_SUFFIX = ".safetensors"


@dataclass
class HotAgent:
    """An agent whose cache is in memory. Runtime state only: none of it is persisted as is."""

    name: str
    cache: list
    tokens: list[int]  # exactly the ids the cache holds
    dirty: bool = False
    nbytes: int = 0
    last_saved_at: float | None = None
    last_used: float = 0.0
    busy: int = 0  # requests in flight; a busy agent is never evicted


@dataclass
class ChatResult:
    text: str
    cache_source: str  # "memory" | "disk" | "rebuilt" | "new"
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prompt_tokens: int
    restore_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    finish_reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CacheProblem:
    """A cache file that was refused: shown in status, kept in quarantine for inspection."""

    agent: str
    reason: str
    message: str
    moved_to: str
    at: float


class AgentStore:
    def __init__(
        self,
        home: Path,
        engine: Engine,
        *,
        replace: Callable = atomic_replace,
    ):
        self.home = Path(home)
        self.engine = engine
        self.caches_dir = self.home / "caches"
        self.quarantine_dir = self.caches_dir / "quarantine"
        self.caches_dir.mkdir(parents=True, exist_ok=True)
        self.records = Records(self.home / "agents.db")
        self.expect = Expectation(engine.fingerprint, engine.tokenizer_fingerprint, engine.dtype)
        self._replace = replace
        self._hot: OrderedDict[str, HotAgent] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()  # guards _hot for readers on other threads
        self.problems: list[CacheProblem] = []
        self._remove_temp_files()
        self._recover_records()

    # ---- records ------------------------------------------------------------------

    def create(self, name: str, role: str = "", system: str = "") -> AgentRecord:
        validate_agent_name(name)
        return self.records.create(name, role, system)

    def fork(self, source: str, name: str) -> AgentRecord:
        validate_agent_name(name)
        self.records.fork(source, name)
        return self.records.get(name, with_messages=False)

    def delete(self, name: str) -> None:
        """Remove the agent. If the file or the record cannot be changed (a read-only home),
        this raises and the agent stays usable, its hot cache included."""
        self.records.get(name, with_messages=False)  # NOT_FOUND before anything is touched
        # The file goes before the record: its copy of the record would bring the agent
        # back at the next start (see _recover_records) if a crash came between the two.
        # The hot cache goes last, once nothing can fail.
        self._unlink_cache(name)
        self.records.delete(name)
        self._drop(name)

    def reset(self, name: str) -> None:
        """Forget the conversation, keep role and system prompt; the cache goes with it.
        The same order and the same guarantee on failure as `delete`."""
        self.records.get(name, with_messages=False)
        self._unlink_cache(name)  # first, as in delete: the file's record copy holds the old turns
        self.records.reset(name)
        self._drop(name)

    def _unlink_cache(self, name: str) -> None:
        try:
            self.cache_path(name).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.caches_dir)
        if (agent := self._hot.get(name)) is not None:
            agent.dirty = True  # its file is gone: should the record change fail, memory is the only copy

    # ---- the cache lifecycle ------------------------------------------------------

    def cache_path(self, name: str) -> Path:
        return self.caches_dir / (validate_agent_name(name) + CACHE_SUFFIX)

    def is_hot(self, name: str) -> bool:
        return name in self._hot

    def acquire(self, name: str) -> tuple[HotAgent, str, float]:
        """Make the agent hot. Returns it, where its cache came from, and the restore time in ms."""
        if name in self._hot:
            with self._lock:
                self._hot.move_to_end(name)
            return self._hot[name], "memory", 0.0
        rec = self.records.get(name, with_messages=False)
        t0 = time.perf_counter()
        path = self.cache_path(name)
        agent = None
        source = "new" if rec.n_messages == 0 else "rebuilt"
        if path.exists():
            try:
                loaded = load_cache(path, self.expect)
                agent = HotAgent(name, loaded.cache, loaded.tokens, last_saved_at=path.stat().st_mtime)
                source = "disk"
            except CacheFileError as e:
                self._quarantine(name, path, e)
                source = "rebuilt"
        if agent is None:
            agent = HotAgent(name, self.engine.new_cache(), [])
        agent.nbytes = cache_nbytes(agent.cache)
        agent.last_used = time.time()
        with self._lock:
            self._hot[name] = agent
        return agent, source, (time.perf_counter() - t0) * 1000

    def chat(
        self,
        name: str,
        message: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ChatResult:
        """One turn. The turn is committed to the records before this returns.

        A prompt that leaves the model no room to reply raises ContextTooLong before the
        cache is loaded or anything is prefilled; the reply is cut at the context's end
        (finish_reason "length"). A cancelled turn is not recorded and does not make the
        agent dirty: what it computed stays in memory for the next turn's prefix, but it
        never makes a save (nor a file for an agent that has none).
        """
        rec = self.records.get(name)
        prompt = self.engine.render(rec.system, rec.messages + [{"role": "user", "content": message}])
        limit = self.engine.context_length
        if limit is not None:
            self._check_context(name, rec, len(prompt), limit)
            max_tokens = min(max_tokens, limit - len(prompt))
        agent, source, restore_ms = self.acquire(name)
        agent.busy += 1
        try:
            cache, gen = self.engine.generate(
                agent.cache,
                agent.tokens,
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                on_token=on_token,
                should_stop=should_stop,
                on_progress=on_progress,
            )
            agent.cache, agent.tokens = cache, gen.cache_tokens
            agent.nbytes = cache_nbytes(cache)
            agent.last_used = time.time()
            if gen.finish_reason != "cancelled":
                self.records.append_turn(name, message, gen.text)
                agent.dirty = True
        finally:
            agent.busy -= 1
        if gen.rebuilt:
            source = "rebuilt"
        decode_tps = (len(gen.tokens) - 1) / gen.decode_s if len(gen.tokens) > 1 and gen.decode_s > 0 else 0.0
        return ChatResult(
            text=gen.text,
            cache_source=source,
            cached_tokens=gen.reused_tokens,
            prefilled_tokens=gen.prefilled_tokens,
            generated_tokens=len(gen.tokens),
            prompt_tokens=gen.prompt_tokens,
            restore_ms=round(restore_ms, 3),
            ttft_ms=round(gen.ttft_s * 1000 + restore_ms, 3),
            decode_tokens_per_s=round(decode_tps, 2),
            finish_reason=gen.finish_reason,
        )

    @staticmethod
    def _check_context(name: str, rec: AgentRecord, prompt_tokens: int, limit: int) -> None:
        if prompt_tokens < limit:
            return
        if rec.messages:
            advice = (f"send a shorter message, or start the conversation over with `agentctl reset {name}` "
                      "(role and system prompt are kept)")
        else:
            advice = "send a shorter message (or give the agent a shorter system prompt)"
        raise ContextTooLong(
            f"agent {name!r}: the conversation with this message is {prompt_tokens} tokens and the model's "
            f"context is {limit}, which leaves no room for a reply; nothing was recorded: {advice}"
        )

    def warm(self, name: str) -> str:
        """Make the agent hot and its cache current with its records, without replying."""
        rec = self.records.get(name)
        agent, source, _ = self.acquire(name)
        if not rec.system and not rec.messages:
            return source
        tokens = self.engine.render(rec.system, rec.messages, add_generation_prompt=False)
        if tokens != agent.tokens:
            agent.cache, agent.tokens = self.engine.prefill(agent.cache, agent.tokens, tokens)
            agent.nbytes, agent.dirty = cache_nbytes(agent.cache), True
        return source

    def save(self, name: str) -> bool:
        """Write a dirty hot agent's cache to disk. Returns whether a file was written."""
        agent = self._hot.get(name)
        if agent is None or not agent.dirty:
            return False
        rec = self.records.get(name)
        try:
            save_cache(
                self.cache_path(name),
                agent.cache,
                agent.tokens,
                self.expect,
                agent=name,
                extra_meta={"agentd.record": _record_json(rec)},
                replace=self._replace,
            )
        except UnsupportedCache as e:
            # Nothing is lost: the transcript is in the records and rebuilds the cache.
            log.warning("agent %s: cache not saved: %s", name, e)
            agent.dirty = False
            return False
        agent.dirty = False
        agent.last_saved_at = time.time()
        return True

    def save_all(self) -> list[str]:
        """Save every dirty agent; the first failure is raised after the rest were tried."""
        saved, first_error = [], None
        for name in list(self._hot):
            try:
                if self.save(name):
                    saved.append(name)
            except (OSError, NotFound) as e:
                first_error = first_error or e
        if first_error:
            raise first_error
        return saved

    def evict(self, name: str) -> bool:
        """Save (if dirty) and drop an agent's cache from memory. Returns whether it was dirty."""
        agent = self._hot.get(name)
        if agent is None:
            return False
        if agent.busy:
            raise RuntimeError(f"agent {name!r} has a request in flight")
        was_dirty = agent.dirty
        self.save(name)
        self._drop(name)
        return was_dirty

    def _drop(self, name: str) -> None:
        with self._lock:
            agent = self._hot.pop(name, None)
        if agent is not None:
            agent.cache = None
            # Without this MLX keeps the freed buffers in its own cache and RSS stays up.
            mx.clear_cache()

    # ---- accounting ---------------------------------------------------------------

    def lru(self) -> list[str]:
        """Hot agents, least recently used first."""
        with self._lock:
            return list(self._hot)

    def hot_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._hot.values())

    def nbytes(self, name: str) -> int:
        agent = self._hot.get(name)
        return agent.nbytes if agent else 0

    def snapshot(self) -> dict[str, dict]:
        """Runtime facts of hot agents, safe to read from any thread."""
        with self._lock:
            return {
                n: {
                    "tokens": len(a.tokens),
                    "bytes": a.nbytes,
                    "dirty": a.dirty,
                    "busy": a.busy,
                    "last_saved_at": a.last_saved_at,
                    "last_used": a.last_used,
                }
                for n, a in self._hot.items()
            }

    def info(self, rec: AgentRecord, hot: dict | None = None) -> dict:
        """The AgentInfo a client sees, for a hot or cold agent."""
        if hot is not None:
            return {
                "name": rec.name,
                "role": rec.role,
                "state": "hot",
                "tokens": hot["tokens"],
                "bytes": hot["bytes"],
                "dirty": hot["dirty"],
                "messages": rec.n_messages,
                "created_at": rec.created_at,
                "updated_at": rec.updated_at,
                "last_saved_at": hot["last_saved_at"],
            }
        tokens, size, saved = 0, 0, None
        path = self.caches_dir / (rec.name + CACHE_SUFFIX)
        with contextlib.suppress(OSError, CacheFileError, ValueError):
            st = path.stat()
            size, saved = st.st_size, st.st_mtime
            tokens = int(read_header(path).get("agentd.n_tokens", 0))
        return {
            "name": rec.name,
            "role": rec.role,
            "state": "cold",
            "tokens": tokens,
            "bytes": size,
            "dirty": False,
            "messages": rec.n_messages,
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
            "last_saved_at": saved,
        }

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
        del self.problems[:-20]

    def _remove_temp_files(self) -> None:
        """Temp files of writes a crash interrupted: never loaded, removed at start."""
        for p in self.caches_dir.iterdir():
            if is_temp(p):
                with contextlib.suppress(OSError):
                    p.unlink()
                log.info("removed an interrupted write: %s", p.name)

    def _recover_records(self) -> None:
        """Cache files without a record (agents.db was lost or replaced): every file carries
        a copy of its agent's record as of its last save, so the agent comes back with the
        conversation up to that save instead of being silently dropped."""
        for path in sorted(self.caches_dir.glob("*" + CACHE_SUFFIX)):
            name = path.name[: -len(CACHE_SUFFIX)]
            if not path.is_file() or is_temp(path):
                continue
            try:
                validate_agent_name(name)
            except ProtocolError:
                log.warning("ignoring %s: not the name of an agent's cache file", path.name)
                continue
            if self.records.exists(name):
                continue
            try:
                rec = _record_from_json(read_verified_header(path).get("agentd.record"), name)
            except CacheFileError as e:
                self._quarantine(name, path, e)
                continue
            except (ValueError, KeyError, TypeError) as e:
                self._quarantine(name, path, CacheFileError("record", f"{path.name}: no usable record copy ({e})"))
                continue
            self.records.restore(rec)
            log.warning("agent %s: its record was missing; recovered %d message(s) from its cache file",
                        name, len(rec.messages))

    def close(self) -> None:
        self.records.close()


def _record_json(rec: AgentRecord) -> str:
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


def _record_from_json(text: str | None, name: str) -> AgentRecord:
    """The inverse of _record_json, checked: the copy must be of this agent and well-formed."""
    if text is None:
        raise ValueError("the file carries no record")
    d = json.loads(text)
    if d["name"] != name:
        raise ValueError(f"the record inside is agent {d['name']!r}'s")
    messages = [{"role": m["role"], "content": m["content"]} for m in d["messages"]]
    if not all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages):
        raise TypeError("messages must be role and content strings")
    if not isinstance(d["role"], str) or not isinstance(d["system"], str):
        raise TypeError("role and system must be strings")
    created, updated = float(d["created_at"]), float(d["updated_at"])
    return AgentRecord(name, d["role"], d["system"], created, updated, updated, len(messages), messages)
