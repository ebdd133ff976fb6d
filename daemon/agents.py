"""Persistent agents: records in SQLite, KV caches hot in memory or cold on disk.

`AgentStore` is the library form of agentd and the facade over its three parts: the
records (`records.py`, the source of truth), the hot set (`hotset.py`, caches in memory)
and the cache repository (`cacherepo.py`, caches on disk). It has no sockets and no
threads of its own. Every method that touches MLX must be called from one thread (the
daemon's MLX thread); `snapshot`, `lru`, `hot_bytes`, `info` and the record reads are
safe from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_replace
from .cachefile import Expectation, cache_nbytes
from .cacherepo import CacheProblem, CacheRepository, Refusal  # noqa: F401 (re-exported)
from .engine import Engine, common_prefix_len
from .kvstore import KVSettings
from .hotset import HotAgent, HotSet
from .protocol import Sampling, validate_agent_name
from .records import AgentRecord, AlreadyExists, NotFound, Records
from .responses import AgentInfo, CacheSource, ChatResult
from .restore_reads import give_back_unused
from .sequence import Generation, Sequence
from .stepper import Stepper
from .windows import WindowGuard, has_windows

log = logging.getLogger("agentd.agents")


@dataclass
class Turn:
    """A turn from admission to retirement: the agent it belongs to and its sequence."""

    agent: HotAgent
    seq: Sequence
    new_messages: list[dict]
    source: CacheSource
    restore_ms: float
    window: WindowGuard | None = None  # the sliding windows before the reply (windows.py)

    @property
    def name(self) -> str:
        return self.agent.name


class AgentStore:
    def __init__(
        self,
        home: Path,
        engine: Engine,
        *,
        replace: Callable = atomic_replace,
        kv: KVSettings | None = None,
    ):
        self.home = Path(home)
        self.engine = engine
        self.caches_dir = self.home / "caches"
        self.home.mkdir(parents=True, exist_ok=True)
        self.records = Records(self.home / "agents.db")
        kv = kv or KVSettings(getattr(engine, "kv_bits", None), getattr(engine, "kv_group_size", 64))
        self.repo = CacheRepository(
            self.caches_dir, Expectation(engine.fingerprint, engine.tokenizer_fingerprint, engine.dtype),
            engine.new_cache, kv, replace=replace,
        )
        self.hot = HotSet()
        self.repo.recover_records(self.records)
        self._stepper = Stepper(engine)  # for chat(), the library's one-turn-at-a-time path

    # The names tests and benchmarks have used; the parts above are the real owners.
    @property
    def expect(self) -> Expectation:
        return self.repo.expect

    @property
    def problems(self) -> list[CacheProblem]:
        return self.repo.problems

    @property
    def _hot(self) -> HotSet:
        return self.hot

    @property
    def _replace(self) -> Callable:
        return self.repo.replace

    @_replace.setter
    def _replace(self, fn: Callable) -> None:
        self.repo.replace = fn

    def cache_path(self, name: str) -> Path:
        return self.repo.path(name)

    # ---- records ------------------------------------------------------------------

    def create(self, name: str, role: str = "", system: str = "") -> AgentRecord:
        validate_agent_name(name)
        return self.records.create(name, role, system)

    def fork(self, source: str, name: str) -> AgentRecord:
        """A copy of `source`'s record and, where the model allows, of its saved cache:
        the fork's blocks are the source's, so its first turn prefills only the new message."""
        validate_agent_name(name)
        self.records.fork(source, name)
        with contextlib.suppress(OSError, NotFound):
            self.save(source)  # a dirty source is saved first so the fork gets all of it
            self.repo.fork(source, name, self.records.get(name))
        return self.records.get(name, with_messages=False)

    def delete(self, name: str) -> None:
        """Remove the agent. If the file or the record cannot be changed (a read-only home),
        this raises and the agent stays usable, its hot cache included."""
        self.records.get(name, with_messages=False)  # NOT_FOUND before anything is touched
        # The file goes before the record: its copy of the record would bring the agent
        # back at the next start (see CacheRepository.recover_records) if a crash came between.
        # The hot cache goes last, once nothing can fail.
        self._delete_file(name)
        self.records.delete(name)
        self._drop(name)

    def reset(self, name: str) -> None:
        """Forget the conversation, keep role and system prompt; the cache goes with it.
        The same order and the same guarantee on failure as `delete`."""
        self.records.get(name, with_messages=False)
        self._delete_file(name)  # first, as in delete: the file's record copy holds the old turns
        self.records.reset(name)
        self._drop(name)

    def _delete_file(self, name: str) -> None:
        if self.repo.delete(name) and (agent := self.hot.get(name)) is not None:
            agent.dirty = True  # its file is gone: should the record change fail, memory is the only copy

    def gc(self) -> dict:
        """Remove stored blocks no agent's durable manifest names (also done at start and after deletes)."""
        return self.repo.gc()

    def adopt(self, rec: AgentRecord, cache: list | None, tokens: list[int]) -> None:
        """Add a whole agent made elsewhere (an imported bundle): its record and, if given,
        its cache, which holds exactly `tokens`. It is all there or none of it is.

        The cache goes to the repository first, with a copy of the record: a crash before
        its write completes leaves a temp file (removed at start), one after it a file
        whose record copy `recover_records` restores at start. No crash leaves half an agent.
        """
        name = validate_agent_name(rec.name)
        if self.records.name_taken(name):
            raise AlreadyExists(f"agent {name!r} already exists")
        saved = cache is not None and self.repo.save(name, cache, tokens, rec)
        try:
            self.records.add(rec)
        except BaseException:
            if saved:
                self.repo.delete(name)  # a create() on the event-loop thread took the name meanwhile
            raise

    # ---- the cache lifecycle ------------------------------------------------------

    def is_hot(self, name: str) -> bool:
        return name in self.hot

    def acquire(self, name: str, *, load: bool = True) -> tuple[HotAgent, CacheSource, float]:
        """Make the agent hot. Returns it, where its cache came from, and the restore time in ms.
        With `load` False a cold agent starts from an empty cache: its stored one is not read."""
        agent = self.hot.get(name)
        if agent is not None:
            self.hot.touch(name)
            return agent, "memory", 0.0
        rec = self.records.get(name, with_messages=False)
        t0 = time.perf_counter()
        source: CacheSource = "new" if rec.n_messages == 0 else "rebuilt"
        loaded = self.repo.load(name) if load else None
        if loaded is None or isinstance(loaded, Refusal):
            if loaded is not None:
                source = "rebuilt"  # a refused file: its turns come back from the transcript
            agent = HotAgent(name, self.engine.new_cache(), [])
        else:
            # A v1 file stays dirty until it is saved as blocks (which removes it).
            agent = HotAgent(name, loaded.cache, loaded.tokens, dirty=loaded.migrated,
                             last_saved_at=self.repo.saved_at(name))
            source = "disk"
        agent.nbytes = cache_nbytes(agent.cache)
        agent.last_used = time.time()
        self.hot.put(agent)
        return agent, source, (time.perf_counter() - t0) * 1000

    # ---- turns: begin (on admission), driven by a Stepper, end (on retirement) ---------

    def open_turn(
        self,
        agent: HotAgent,
        source: CacheSource,
        restore_ms: float,
        prompt: list[int],
        sampling: Sampling,
        new_messages: list[dict],
        *,
        adopt_stored: bool = True,
        on_token: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        render_after: Callable[[str], list[int]] | None = None,
    ) -> Turn:
        """Start a sequence from `agent`'s cache towards `prompt`. The agent is busy (never
        evicted, saved or dropped) and its cache belongs to the sequence until close_turn.
        Where the block store holds a longer prefix of `prompt` than the cache, it is loaded first.
        With `render_after` (the transcript this turn leaves, given its reply), sliding-window
        layers the reply could wrap are copied once the prompt is in, for `end_turn` (windows.py)."""
        t0 = time.perf_counter()
        if adopt_stored and not agent.busy and self._adopt_stored_prefix(agent, prompt[:-1]):
            source = "disk"
            restore_ms += (time.perf_counter() - t0) * 1000
        guard = None
        if render_after is not None and not agent.busy and has_windows(agent.cache):
            guard = WindowGuard(render_after, sampling.max_tokens)
            on_progress = guard.progress(on_progress)
        seq = Sequence(self.engine, agent.cache, agent.tokens, prompt, sampling,
                       on_token=on_token, on_progress=on_progress, should_stop=should_stop)
        agent.busy += 1
        agent.cache = None  # one copy, not two (a batch holds the rows merged)
        if guard is not None:
            guard.attach(seq)
        return Turn(agent, seq, [dict(m) for m in new_messages], source, restore_ms, guard)

    def close_turn(self, turn: Turn) -> Generation:
        """The finished sequence's cache and tokens back to its agent (released from any batch
        first: Stepper.release). The agent is no longer busy; nothing is recorded here."""
        agent, gen = turn.agent, turn.seq.result()
        agent.cache, agent.tokens = turn.seq.cache, gen.cache_tokens
        # The `complete` op's scratch is never saved; a cancelled turn is not recorded and makes
        # nothing to save either: what it computed stays for the next turn's prefix, but it never
        # causes a write (nor a file for an agent that has none).
        agent.dirty = agent.dirty or (bool(agent.name) and gen.finish_reason != "cancelled")
        agent.nbytes = cache_nbytes(agent.cache)
        agent.last_used = time.time()
        agent.busy -= 1
        if gen.ttft_s:
            t = gen.timings
            log.info("turn %s: first token at %.0f ms: restore %.0f ms, waited %.0f ms, prefill of %d tokens "
                     "(%d cached) %.0f ms", agent.name or "(scratch)", gen.ttft_s * 1000 + turn.restore_ms,
                     turn.restore_ms, t.get("waited_ms", 0), gen.prefilled_tokens, gen.reused_tokens,
                     t.get("prefill_ms", 0))
        return gen

    def begin_turn(
        self,
        name: str,
        new_messages: list[dict],
        sampling: Sampling,
        *,
        rebuild: bool = False,
        on_token: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Turn:
        """A chat turn: render the agent's transcript plus `new_messages`, make it hot, prepare.

        A prompt that leaves the model no room to reply raises ContextTooLong before the cache
        is loaded or anything is prefilled; the reply is cut at the context's end ("length").
        `rebuild` starts from an empty cache (nothing from memory or the stored blocks): the
        whole prompt is prefilled and the result says "rebuilt".
        """
        rec = self.records.get(name)
        prompt = self.engine.render(rec.system, rec.messages + new_messages)
        room = self.engine.room_for_reply(len(prompt), sampling.max_tokens, who=f"agent {name!r}: ",
                                          advice=_context_advice(name, rec))
        if room < sampling.max_tokens:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        # A rebuild of a cold agent does not read its stored cache only to drop it (on an H200
        # that was a 4.3 GB restore before a 32k-token rebuild; and a rebuild is what a user
        # asks for when that cache is in doubt).
        agent, source, restore_ms = self.acquire(name, load=not rebuild)
        if rebuild and not agent.busy:
            agent.cache, agent.tokens, source, restore_ms = self.engine.new_cache(), [], "rebuilt", 0.0
        def render_after(reply: str) -> list[int]:
            return self.engine.render(rec.system, rec.messages + new_messages + [{"role": "assistant", "content": reply}],
                                      add_generation_prompt=False)

        return self.open_turn(agent, source, restore_ms, prompt, sampling, new_messages, adopt_stored=not rebuild,
                              on_token=on_token, on_progress=on_progress, should_stop=should_stop,
                              render_after=render_after)

    def end_turn(self, turn: Turn) -> ChatResult:
        """Give the cache back and commit the turn (unless cancelled) before the result exists."""
        gen = self.close_turn(turn)
        if gen.finish_reason != "cancelled":
            self.records.commit_turn(turn.name, turn.new_messages + [{"role": "assistant", "content": gen.text}])
            if turn.window is not None:  # keep a cache the next prompt extends (windows.py)
                agent = turn.agent
                agent.cache, agent.tokens = turn.window.settle(self.engine, agent.cache, agent.tokens, gen.text)
                agent.nbytes = cache_nbytes(agent.cache)
        source: CacheSource = "rebuilt" if gen.rebuilt else turn.source
        decode_tps = (len(gen.tokens) - 1) / gen.decode_s if len(gen.tokens) > 1 and gen.decode_s > 0 else 0.0
        return ChatResult(
            text=gen.text,
            cache_source=source,
            cached_tokens=gen.reused_tokens,
            prefilled_tokens=gen.prefilled_tokens,
            generated_tokens=len(gen.tokens),
            prompt_tokens=gen.prompt_tokens,
            restore_ms=round(turn.restore_ms, 3),
            ttft_ms=round(gen.ttft_s * 1000 + turn.restore_ms, 3),
            decode_tokens_per_s=round(decode_tps, 2),
            finish_reason=gen.finish_reason,
        )

    def abort_turn(self, turn: Turn) -> None:
        """A step failed mid-turn: the cache's state is unknown, so it is dropped (the next
        turn restores from disk or the transcript); nothing is recorded."""
        turn.agent.busy -= 1
        turn.seq.cache = None
        if self.hot.get(turn.agent.name) is turn.agent:
            self._drop(turn.agent.name)

    def chat(
        self,
        name: str,
        message: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        sampling: Sampling | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ChatResult:
        """One turn, run alone on the calling thread. Committed to the records before it returns."""
        turn = self.begin_turn(name, [{"role": "user", "content": message}],
                               sampling or Sampling(max_tokens, temperature, seed=seed),
                               on_token=on_token, on_progress=on_progress, should_stop=should_stop)
        try:
            self._stepper.run_alone(turn.seq)
        except BaseException:
            self.abort_turn(turn)
            raise
        return self.end_turn(turn)

    def _adopt_stored_prefix(self, agent: HotAgent, tokens: list[int]) -> bool:
        """Swap in blocks the store holds for a longer prefix of `tokens` than the agent's
        cache: a new agent, a fork, a reset or an edited turn loads them instead of prefilling."""
        have = common_prefix_len(agent.tokens, tokens)
        if self.repo.stored_prefix(tokens) <= have:
            return False
        loaded = self.repo.load_prefix(tokens, have)
        if loaded is None:
            return False
        agent.cache, agent.tokens = loaded.cache, loaded.tokens
        agent.nbytes = cache_nbytes(agent.cache)
        return True

    def warm(self, name: str) -> CacheSource:
        """Make the agent hot and its cache current with its records, without replying."""
        rec = self.records.get(name)
        agent, source, _ = self.acquire(name)
        if not rec.system and not rec.messages:
            return source
        tokens = self.engine.render(rec.system, rec.messages, add_generation_prompt=False)
        if tokens != agent.tokens and self._adopt_stored_prefix(agent, tokens):
            source = "disk"
        if tokens != agent.tokens:
            agent.cache, agent.tokens = self.engine.prefill(agent.cache, agent.tokens, tokens)
            agent.nbytes, agent.dirty = cache_nbytes(agent.cache), True
        return source

    def save(self, name: str) -> bool:
        """Write a dirty hot agent's cache to disk. Returns whether a file was written."""
        agent = self.hot.get(name)
        if agent is None or not agent.dirty or agent.busy:
            return False  # a busy agent's cache belongs to its turn; it is saved after it
        written = self.repo.save(name, agent.cache, agent.tokens, self.records.get(name))
        # Not written (a cache class the format cannot store) is not a failure to retry:
        # nothing is lost, the transcript in the records rebuilds the cache.
        agent.dirty = False
        if written:
            agent.last_saved_at = time.time()
        return written

    def save_all(self) -> list[str]:
        """Save every dirty agent not mid-turn; the first failure is raised after the rest
        were tried."""
        saved, first_error = [], None
        for name in self.hot.lru():
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
        agent = self.hot.get(name)
        if agent is None:
            return False
        if agent.busy:
            raise RuntimeError(f"agent {name!r} has a request in flight")
        was_dirty = agent.dirty
        self.save(name)
        self._drop(name)
        return was_dirty

    def _drop(self, name: str) -> None:
        agent = self.hot.pop(name)
        if agent is not None:
            agent.cache = None
            self.free_unused_memory()

    @staticmethod
    def free_unused_memory() -> None:
        """After a cache is let go: without this MLX keeps the freed buffers in its own
        cache (and the start's restore reserve) and RSS stays up."""
        give_back_unused()

    # ---- accounting ---------------------------------------------------------------

    def lru(self) -> list[str]:
        """Hot agents, least recently used first."""
        return self.hot.lru()

    def hot_bytes(self) -> int:
        return self.hot.total_bytes()

    def nbytes(self, name: str) -> int:
        agent = self.hot.get(name)
        return agent.nbytes if agent else 0

    def snapshot(self) -> dict[str, dict]:
        """Runtime facts of hot agents as plain dicts, safe to read from any thread."""
        return {n: asdict(f) for n, f in self.hot.snapshot().items()}

    def infos(self, records: list[AgentRecord]) -> list[AgentInfo]:
        """The AgentInfo a client sees of each record, from one snapshot of the hot set."""
        snap = self.hot.snapshot()
        return [self._info(rec, snap.get(rec.name)) for rec in records]

    def info(self, name: str) -> AgentInfo:
        return self.infos([self.records.get(name, with_messages=False)])[0]

    def _info(self, rec: AgentRecord, hot) -> AgentInfo:
        if hot is not None:
            return AgentInfo(rec.name, rec.role, "hot", hot.tokens, hot.bytes, hot.dirty, rec.n_messages,
                             rec.created_at, rec.updated_at, hot.last_saved_at)
        cold = self.repo.info(rec.name)
        return AgentInfo(rec.name, rec.role, "cold", cold.tokens, cold.bytes, False, rec.n_messages,
                         rec.created_at, rec.updated_at, cold.saved_at)

    def close(self) -> None:
        self.records.close()



def _context_advice(name: str, rec: AgentRecord) -> str:
    """How to go on when a turn does not fit the context (see ARCHITECTURE.md, "Context length")."""
    if rec.messages:
        return (f"send a shorter message, or start the conversation over with `agentctl reset {name}` "
                "(role and system prompt are kept)")
    return "send a shorter message (or give the agent a shorter system prompt)"
