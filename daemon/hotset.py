"""The hot set: agents whose KV cache is in memory, in LRU order, with their sizes and
whether a turn is using them.

Mutated only on the MLX thread; `snapshot`, `lru` and `total_bytes` take the lock and are
safe from any thread (status and list answer from them while a generation runs).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


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
    busy: int = 0  # turns in flight; a busy agent is never evicted, saved or dropped


@dataclass(frozen=True)
class HotFacts:
    """What other threads may know of a hot agent (a copy, taken under the lock)."""

    tokens: int
    bytes: int
    dirty: bool
    busy: int
    last_saved_at: float | None
    last_used: float


class HotSet:
    def __init__(self) -> None:
        self._agents: OrderedDict[str, HotAgent] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._agents

    def __iter__(self):
        return iter(self.lru())

    def get(self, name: str) -> HotAgent | None:
        return self._agents.get(name)

    def __getitem__(self, name: str) -> HotAgent:
        return self._agents[name]

    def put(self, agent: HotAgent) -> None:
        with self._lock:
            self._agents[agent.name] = agent
            self._agents.move_to_end(agent.name)

    def touch(self, name: str) -> None:
        """Mark as most recently used."""
        with self._lock:
            self._agents.move_to_end(name)

    def pop(self, name: str) -> HotAgent | None:
        with self._lock:
            return self._agents.pop(name, None)

    def lru(self) -> list[str]:
        """Hot agents, least recently used first."""
        with self._lock:
            return list(self._agents)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._agents.values())

    def snapshot(self) -> dict[str, HotFacts]:
        """Runtime facts of every hot agent, LRU order, safe to read from any thread."""
        with self._lock:
            return {
                n: HotFacts(len(a.tokens), a.nbytes, a.dirty, a.busy, a.last_saved_at, a.last_used)
                for n, a in self._agents.items()
            }
