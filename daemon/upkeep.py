"""The daemon's upkeep policies: when to flush dirty caches to disk, and which hot agents
to evict for memory. Both run between turns on the MLX thread, never inside one.

The pure eviction choice and the memory probe are in `memory.py`; this module applies
them to the store and keeps the state `status` reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .memory import HotFacts, Limits, MemoryProbe, choose_evictions, memory_short

log = logging.getLogger("agentd.upkeep")

MAX_FLUSH_BACKOFF_S = 300.0


@dataclass
class FlushPolicy:
    """Flush every `interval_s` while something is dirty; after a failure, back off
    exponentially (interval * 2**failures, at most MAX_FLUSH_BACKOFF_S)."""

    interval_s: float
    last_flush_at: float | None = None
    last_result: str = "never"  # "never" | "ok" | "failed"
    last_error: str | None = None
    consecutive_failures: int = 0
    next_due: float = 0.0

    @classmethod
    def starting_now(cls, interval_s: float) -> "FlushPolicy":
        return cls(interval_s, next_due=time.time() + interval_s)

    def due(self, any_dirty: bool, now: float | None = None) -> bool:
        """Whether to flush now. When due with nothing dirty, the next check moves on."""
        now = time.time() if now is None else now
        if now < self.next_due:
            return False
        if not any_dirty:
            self.next_due = now + self.interval_s
            return False
        return True

    def succeeded(self, saved: list[str]) -> None:
        self.last_flush_at = time.time()
        self.last_result, self.last_error, self.consecutive_failures = "ok", None, 0
        self.next_due = time.time() + self.interval_s
        if saved:
            log.info("flushed %d agent(s)", len(saved))

    def failed(self, err: BaseException) -> None:
        self.consecutive_failures += 1
        self.last_result, self.last_error = "failed", f"{type(err).__name__}: {err}"
        backoff = min(self.interval_s * 2**self.consecutive_failures, MAX_FLUSH_BACKOFF_S)
        self.next_due = time.time() + backoff
        log.error("flush failed (%d in a row), retrying in %.0fs: %s", self.consecutive_failures, backoff, err)

    def status(self) -> dict:
        return {
            "interval_s": self.interval_s,
            "last_flush_at": self.last_flush_at,
            "last_result": self.last_result,
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
        }


class MemoryPolicy:
    """Evict what the limits and the system's pressure ask for; never an agent mid-turn."""

    def __init__(self, limits: Limits, probe: MemoryProbe):
        self.limits, self.probe = limits, probe
        self.pressure = "normal"

    def enforce(self, store, scratch=None) -> list[str]:
        """Runs on the MLX thread. Returns the names evicted (each saved first if dirty).
        `scratch` (the `complete` op's cache, `Turns`) goes first, before any agent, when
        the caches with it exceed the budget or memory is short: it costs no write, only
        the next completion's reuse of a resent prefix."""
        snap = store.hot.snapshot()
        hot = [HotFacts(n, f.bytes, f.dirty, f.busy > 0) for n, f in snap.items()]
        reading = self.probe.read()
        self.pressure = reading.level
        short, freed = memory_short(reading, self.limits), 0
        if scratch is not None and scratch.scratch_bytes():
            over_budget = sum(a.nbytes for a in hot) + scratch.scratch_bytes() > self.limits.cache_budget
            if over_budget or short:
                freed = scratch.drop_scratch()
                if freed:
                    log.info("dropped the completions' scratch cache (%d bytes; budget=%d, available=%d, level=%s)",
                             freed, self.limits.cache_budget, reading.available, reading.level)
        evicted = []
        for name in choose_evictions(hot, self.limits, reading):
            try:
                store.evict(name)
                evicted.append(name)
                log.info("evicted %s (hot=%d, budget=%d, available=%d, level=%s)", name, len(hot),
                         self.limits.cache_budget, reading.available, reading.level)
            except Exception as e:  # a failed save keeps the agent hot and dirty; flush retries
                log.error("could not evict %s: %s", name, e)
        # Memory short: MLX's freed buffers (the start's restore reserve among them) go back,
        # unless an eviction or the scratch's drop above has already given them back.
        if short and not (evicted or freed):
            store.free_unused_memory()
        return evicted

    def status(self) -> dict:
        return {
            "max_hot": self.limits.max_hot,
            "cache_budget": self.limits.cache_budget,
            "min_available": self.limits.min_available,
        }
