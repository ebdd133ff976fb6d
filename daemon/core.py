"""The daemon's state and one handler per request, with no sockets.

`Daemon.handle(request, emit)` answers a typed request: reads (list, show, history,
status, ping) run on the caller's thread from the records and the store's snapshot;
everything that touches MLX goes to the scheduler's MLX thread (turns as sequences it
batches, everything else as jobs between its steps). Errors become ProtocolError codes here,
at the edge, so a bad request never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import mlx.core as mx

from . import __version__
from . import protocol as p
from . import responses
from . import transfer
from .agents import AgentStore
from .bundle import BundleError
from .engine import ContextTooLong, Engine
from .errors import StartupError
from .kvstore import KVSettings
from .memory import Limits, MemoryProbe
from .records import AlreadyExists, NotFound, RecordError, RecordsReplaced
from .restore_reads import RESERVE_ENV, RestoreReserve, reserve_restores
from .turns import ChatPlan, Turns
from .upkeep import FlushPolicy, MemoryPolicy
from .scheduler import Scheduler

log = logging.getLogger("agentd.core")

# Sends a streamed frame; called with None it only checks the client is still there.
Emit = Callable[[dict | None], Awaitable[None]]
# Reads the next frame of the same connection (an upload); raises ConnectionError if it broke.
Receive = Callable[[], Awaitable[dict]]


@dataclass
class Settings:
    home: Path
    model_dir: Path
    flush_interval: float = 30.0
    max_hot: int = 8
    cache_budget: int = 4 * 10**9
    min_available: int = 1 * 10**9
    preload: int = 0
    kv: KVSettings = field(default_factory=KVSettings)


class Daemon:
    def __init__(self, settings: Settings, engine: Engine, probe: MemoryProbe | None = None):
        self.settings = settings
        self.engine = engine
        self.scheduler = Scheduler()
        try:
            self.store: AgentStore = self.scheduler.open_store(lambda: AgentStore(settings.home, engine, kv=settings.kv))
        except (RecordError, sqlite3.DatabaseError) as e:
            raise StartupError(f"cannot open the records {settings.home / 'agents.db'}: {e}") from None
        self.memory = MemoryPolicy(Limits(settings.max_hot, settings.cache_budget, settings.min_available),
                                   probe or MemoryProbe())
        self.flush = FlushPolicy.starting_now(settings.flush_interval)
        self.scheduler.after_turns = lambda: self.memory.enforce(self.store, self.turns)
        self.started = time.time()
        self.stopping = False
        self._cancels: set[threading.Event] = set()
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="records-read")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="records-write")
        self._turning: set[str] = set()  # agents with a `turn` in flight
        self.restore_reserve: RestoreReserve | None = None  # reserve_restore_memory, at start
        self.turns = Turns(self.store)
        self.http: dict | None = None  # {address, base_url, token_file} once the HTTP front end listens

    # ---- dispatch -----------------------------------------------------------------

    async def handle(self, rid: int, req: p.Request, emit: Emit, receive: Receive | None = None) -> dict:
        """Answer one request. Returns the terminal frame; `emit` sends streamed ones and
        `receive` reads an upload's frames (import)."""
        handler = getattr(self, "_op_" + req.op)  # req.op comes from our own REQUEST_TYPES
        try:
            if self.stopping and req.op not in ("ping", "status", "hello"):
                if req.op == "import" and receive is not None:
                    await transfer.drain_upload(rid, receive, emit)
                raise p.ProtocolError(p.ErrorCode.SHUTTING_DOWN, "agentd is shutting down")
            # An import is an upload: its handler also reads the connection's next frames.
            fields = await (handler(req, rid, emit, receive) if req.op == "import" else handler(req, rid, emit))
            return responses.result(rid, **fields)
        except p.ProtocolError as e:
            return responses.error(rid, e.code, e.message)
        except BundleError as e:
            return responses.error(rid, p.ErrorCode.BAD_BUNDLE, e.message)
        except NotFound as e:
            return responses.error(rid, p.ErrorCode.NOT_FOUND, str(e))
        except AlreadyExists as e:
            return responses.error(rid, p.ErrorCode.ALREADY_EXISTS, str(e))
        except RecordsReplaced as e:
            return responses.error(rid, p.ErrorCode.INTERNAL, str(e))  # logged once, loudly, by Records
        except ContextTooLong as e:
            return responses.error(rid, p.ErrorCode.CONTEXT_TOO_LONG, str(e))
        except sqlite3.Error as e:
            # e.g. a full disk: expected enough to deserve one line, not a traceback.
            log.error("request %s (%s): the records could not be updated: %s", rid, req.op, e)
            if "locked" in str(e):  # another process holds the database's write lock
                return responses.error(rid, p.ErrorCode.BUSY, f"the records are locked by another process ({e}); "
                                                              "nothing was recorded; try again")
            return responses.error(rid, p.ErrorCode.INTERNAL, f"the records could not be updated ({e}); nothing was recorded")
        except ConnectionError:
            raise  # the client went away (emit saw it): no one to answer, nothing went wrong here
        except OSError as e:
            # e.g. a read-only home (delete and reset then change nothing: AgentStore.delete).
            log.error("request %s (%s) failed: %s", rid, req.op, e)
            where = f": {e.filename}" if e.filename else ""
            return responses.error(rid, p.ErrorCode.INTERNAL, f"{req.op} failed ({e.strerror or e}{where})")
        except Exception as e:
            log.exception("request %s (%s) failed", rid, req.op)
            return responses.error(rid, p.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")

    async def _mlx(self, fn, *args, agent: str | None = None, **kwargs):
        """Run `fn` on the MLX thread between steps; with `agent`, after that agent's turn."""
        return await asyncio.wrap_future(self.scheduler.submit(fn, *args, agent=agent, **kwargs))

    async def _io(self, fn, *args, **kwargs):
        """Record reads and cache-file headers, off the event loop: a slow disk then holds
        this request only, never ping or the other connections. (In WAL mode a read never
        waits for a writer, so reads share one thread and one SQLite connection.)"""
        return await self._off_loop(self._reads, fn, *args, **kwargs)

    async def _io_write(self, fn, *args, **kwargs):
        """Record writes on their own thread: one waiting out another process's write lock
        (up to the busy timeout) holds back other writes, never reads or ping."""
        return await self._off_loop(self._writes, fn, *args, **kwargs)

    @staticmethod
    async def _off_loop(executor: ThreadPoolExecutor, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    # ---- handlers -----------------------------------------------------------------

    async def _op_hello(self, req: p.Hello, rid, emit) -> dict:
        if req.protocol != p.PROTOCOL_VERSION:
            raise p.ProtocolError(
                p.ErrorCode.PROTOCOL_MISMATCH,
                f"client speaks protocol {req.protocol}, agentd {__version__} speaks {p.PROTOCOL_VERSION}",
            )
        return {
            "protocol": p.PROTOCOL_VERSION,
            "daemon_version": __version__,
            "model_id": self.engine.model_id,
            "pid": os.getpid(),
        }

    async def _op_ping(self, req, rid, emit) -> dict:
        return {"pong": True, "pid": os.getpid()}

    @property
    def pressure(self) -> str:
        return self.memory.pressure

    async def _op_status(self, req, rid, emit) -> dict:
        reading = self.memory.probe.read()
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "daemon_version": __version__,
            "model": {"id": self.engine.model_id, "path": str(self.engine.model_dir), "bytes": self.engine.model_bytes,
                      "dtype": self.engine.dtype, "device": self.engine.plan.device, "blas": self.engine.plan.blas,
                      "backend": self.engine.plan.backend, "quantized_layers": self.engine.plan.quantized,
                      "attention": self.engine.plan.attention,
                      "warmup": self.engine.warmup.to_dict() if self.engine.warmup else None},
            "memory": {
                "model_bytes": self.engine.model_bytes,
                "cache_bytes": self.store.hot.total_bytes() + self.turns.scratch_bytes(),
                "active_bytes": mx.get_active_memory(),
                "restore_reserve": self.restore_reserve.to_dict() if self.restore_reserve else None,
                "system_available": reading.available,
                "system_total": reading.total,
                "pressure": reading.level,
            },
            "limits": self.memory.status(),
            "flush": self.flush.status(),
            "store": self.store.repo.stats(),
            "scheduler": self.scheduler.status(),
            "problems": [pr.__dict__ for pr in self.store.problems],
            "http": self.http,
            "agents": await self._io(self._infos),
        }

    def _infos(self) -> list[dict]:
        return [i.to_wire() for i in self.store.infos(self.store.records.all())]

    def _info(self, name: str) -> dict:
        return self.store.info(name).to_wire()

    async def _op_create(self, req: p.Create, rid, emit) -> dict:
        await self._io_write(self.store.create, req.name, req.role, req.system)
        return {"agent": await self._io(self._info, req.name)}

    async def _op_fork(self, req: p.Fork, rid, emit) -> dict:
        # On the MLX thread, after the source's turn: a dirty source is saved first (MLX arrays).
        await self._mlx(self.store.fork, req.source, req.name, agent=req.source)
        return {"agent": await self._io(self._info, req.name)}

    async def _op_list(self, req, rid, emit) -> dict:
        return {"agents": await self._io(self._infos)}

    async def _op_show(self, req: p.Show, rid, emit) -> dict:
        rec = await self._io(self.store.records.get, req.name, with_messages=False)
        return {"agent": await self._io(self._info, req.name), "system": rec.system}

    async def _op_history(self, req: p.History, rid, emit) -> dict:
        return {"messages": (await self._io(self.store.records.get, req.name)).messages}

    async def _op_delete(self, req: p.Delete, rid, emit) -> dict:
        await self._mlx(self.store.delete, req.name, agent=req.name)
        return {"deleted": req.name}

    async def _op_reset(self, req: p.Reset, rid, emit) -> dict:
        await self._mlx(self.store.reset, req.name, agent=req.name)
        return {"agent": await self._io(self._info, req.name)}

    async def _op_save(self, req: p.Save, rid, emit) -> dict:
        if req.name is not None:
            await self._io(self.store.records.get, req.name, with_messages=False)  # NOT_FOUND for unknown names
            saved = [req.name] if await self._mlx(self.store.save, req.name, agent=req.name) else []
        else:
            saved = await self._save_every_dirty_agent()
        return {"saved": saved}

    async def _save_every_dirty_agent(self) -> list[str]:
        """save_all between steps; agents mid-turn are skipped there (their cache belongs to
        the turn), so each is saved right after its turn retires: when this returns, every
        agent that was dirty has been saved."""
        saved = await self._mlx(self.store.save_all)
        for name, facts in self.store.hot.snapshot().items():
            if facts.busy and await self._mlx(self.store.save, name, agent=name):
                saved.append(name)
        return saved

    async def _op_evict(self, req: p.Evict, rid, emit) -> dict:
        await self._io(self.store.records.get, req.name, with_messages=False)
        hot = self.store.hot.snapshot().get(req.name)
        if hot is not None and hot.busy:
            raise p.ProtocolError(p.ErrorCode.BUSY, f"agent {req.name!r} has a request in flight")
        was_dirty = await self._mlx(self.store.evict, req.name, agent=req.name)
        return {"evicted": req.name, "was_dirty": was_dirty}

    async def _op_gc(self, req, rid, emit) -> dict:
        reclaimed = await self._mlx(self.store.gc)
        return {**reclaimed, "store": self.store.repo.stats()}

    async def _op_export(self, req: p.Export, rid, emit) -> dict:
        return await transfer.export_op(self, req, rid, emit)

    async def _op_import(self, req: p.Import, rid, emit, receive) -> dict:
        return await transfer.import_op(self, req, rid, emit, receive)

    async def _op_chunk(self, req, rid, emit) -> dict:
        raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "a chunk outside an import upload")

    async def _op_shutdown(self, req, rid, emit) -> dict:
        self.request_shutdown("requested by a client")
        return {"stopping": True}

    async def _op_chat(self, req: p.Chat, rid, emit) -> dict:
        await self._io(self.store.records.get, req.name, with_messages=False)

        return await self._streamed(rid, emit, lambda on_token, should_stop, on_progress: ChatPlan(
            req.name, req.new_messages, req.sampling, rebuild=req.rebuild, on_token=on_token,
            on_progress=on_progress, should_stop=should_stop))

    async def _op_turn(self, req: p.Turn, rid, emit) -> dict:
        await self._io(self.store.records.get, req.name, with_messages=False)
        # A turn that follows a resent conversation decides what to keep from the transcript
        # it reads; a second one in flight for the same agent would read a stale one.
        if req.name in self._turning:
            raise p.ProtocolError(p.ErrorCode.BUSY, f"agent {req.name!r} has a turn in flight")
        self._turning.add(req.name)
        try:
            return await self._streamed(rid, emit, lambda on_token, should_stop, on_progress: self.turns.turn(
                req.name, req.messages, follow=req.follow, system=req.system, tools=req.tools, response=req.response,
                sampling=req.sampling, on_token=on_token, should_stop=should_stop, on_progress=on_progress))
        finally:
            self._turning.discard(req.name)

    async def _op_complete(self, req: p.Complete, rid, emit) -> dict:
        return await self._streamed(rid, emit, lambda on_token, should_stop, on_progress: self.turns.complete(
            req.system, req.messages, tools=req.tools, response=req.response, sampling=req.sampling,
            on_token=on_token, should_stop=should_stop, on_progress=on_progress))

    async def _op_response(self, req: p.GetResponse, rid, emit) -> dict:
        row = await self._io(self.store.records.get_response, req.response_id)
        return {"response_id": row["id"], "agent": row["agent"], "created_at": row["created_at"],
                "n_messages": row["n_messages"], "body": json.loads(row["body"])}

    async def _streamed(self, rid: int, emit: Emit, make_plan: Callable) -> dict:
        """Run the turn plan `make_plan(on_token, should_stop, on_progress)` gives on the
        scheduler, beside every other turn in flight, streaming its token and progress
        frames through `emit`; a client that goes away cancels it (only it)."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)

        def on_token(text: str) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, responses.token(rid, text))

        def on_progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, responses.progress(rid, done, total))

        job = asyncio.wrap_future(self.scheduler.submit_turn(make_plan(on_token, cancel.is_set, on_progress)))
        try:
            while True:
                getter = asyncio.ensure_future(tokens.get())
                done, _ = await asyncio.wait({getter, job}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    getter.cancel()
                    await emit(None)  # a heartbeat: raises if the client has gone (e.g. mid-prefill)
                    continue
                if getter in done:
                    await emit(getter.result())
                    continue
                getter.cancel()
                while not tokens.empty():
                    await emit(tokens.get_nowait())
                break
        except BaseException:
            cancel.set()  # the client went away: stop generating, keep what was computed
            raise
        finally:
            self._cancels.discard(cancel)
        result = job.result()
        if result["finish_reason"] == "cancelled":
            if self.stopping:
                raise p.ProtocolError(p.ErrorCode.SHUTTING_DOWN, "agentd is shutting down; the turn was not recorded")
            raise p.ProtocolError(p.ErrorCode.CANCELLED, "generation cancelled; the turn was not recorded")
        return result

    # ---- policies: flush and memory ----------------------------------------------

    async def tick(self) -> None:
        """Periodic: flush dirty agents when due (with backoff after failures), apply limits."""
        if self.flush.due(any(f.dirty for f in self.store.hot.snapshot().values())):
            await self.flush_now()
        await self._mlx(self.memory.enforce, self.store, self.turns)

    async def flush_now(self) -> list[str]:
        try:
            saved = await self._mlx(self.store.save_all)
        except Exception as e:
            self.flush.failed(e)
            return []
        self.flush.succeeded(saved)
        return saved

    async def reserve_restore_memory(self) -> RestoreReserve | None:
        """At start (CUDA, the CPU): memory for the next restores of the agents used last, as
        many as `max_hot` and the cache budget allow, made ready before any turn asks for it."""
        names = await self._io(self.store.records.most_recent, self.settings.max_hot)
        repo = self.store.repo

        def reserve() -> RestoreReserve | None:
            plans = (rows for rows in map(repo.restore_rows, names) if rows is not None)
            return reserve_restores(plans, self.settings.cache_budget)

        self.restore_reserve = await self._mlx(reserve)
        if self.restore_reserve is not None and self.restore_reserve.agents:
            r = self.restore_reserve
            log.info("restore memory ready for %d agent(s): %.2f GB in %.2fs (the arrays their next restores "
                     "fill; %s=0 skips)", r.agents, r.bytes / 1e9, r.seconds, RESERVE_ENV)
        return self.restore_reserve

    async def preload(self, n: int) -> list[str]:
        names = await self._io(self.store.records.most_recent, n)
        for name in names:
            await self._mlx(self.store.acquire, name, agent=name)
        return names

    # ---- shutdown -----------------------------------------------------------------

    on_shutdown: Callable[[str], None] | None = None

    def request_shutdown(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("shutting down: %s", why)
            for c in list(self._cancels):
                c.set()
            if self.on_shutdown:
                self.on_shutdown(why)

    async def final_flush(self) -> list[str]:
        """After in-flight work is done: save every dirty agent, then close the records."""
        try:
            saved = await self._save_every_dirty_agent()  # cancelled turns retire at the next step
        except Exception as e:
            log.error("final flush failed: %s", e)
            saved = []
        await self._mlx(self.store.close)
        self.scheduler.drain(timeout=30)
        return saved

    async def close_records(self) -> None:
        """Last, once no request can come: close the record connections of the read and write
        threads too. SQLite checkpoints the WAL into the database and removes the -wal and
        -shm files when the last connection closes, so the next start finds no stale WAL."""
        for executor in (self._reads, self._writes):
            await self._off_loop(executor, self.store.records.close)
            executor.shutdown(wait=False)
