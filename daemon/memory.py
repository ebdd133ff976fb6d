"""Memory policy: how many agents stay hot, and which to evict first.

The readings (free memory, the system's pressure level) come through `MemoryProbe`, the
one seam tests replace; everything downstream of it is the real code path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """'4GB' -> 4e9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 4GB, 512MiB, 1000000)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    binary = "i" in unit
    unit = unit.replace("i", "").replace("b", "") or ""
    base = 1024 ** " kmgt".index(unit) if binary and unit else _UNITS[unit]
    return int(number * base)


@dataclass
class Reading:
    available: int  # bytes the system can still give without swapping
    total: int
    level: str  # "normal" | "warn" | "critical"


class MemoryProbe:
    """psutil's available memory plus the platform's own pressure signal when it has one.

    AGENTD_MEMORY_PROBE=file:PATH reads a JSON {"available": n, "level": "warn"} instead:
    the seam tests use to inject pressure into a real daemon.
    """

    def __init__(self, source: str | None = None):
        self.source = source if source is not None else os.environ.get("AGENTD_MEMORY_PROBE", "")

    def read(self) -> Reading:
        vm = psutil.virtual_memory()
        if self.source.startswith("file:"):
            try:
                data = json.loads(Path(self.source[5:]).read_text())
                return Reading(int(data.get("available", vm.available)), vm.total, data.get("level", "normal"))
            except (OSError, ValueError):
                pass
        return Reading(vm.available, vm.total, platform_pressure_level())


def platform_pressure_level() -> str:
    if sys.platform == "darwin":
        # kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical.
        try:
            out = subprocess.run(
                ["sysctl", "-n", "kern.memorystatus_vm_pressure_level"], capture_output=True, text=True, timeout=2
            ).stdout.strip()
            return {"2": "warn", "4": "critical"}.get(out, "normal")
        except (OSError, subprocess.SubprocessError):
            return "normal"
    try:
        # PSI: share of time some task stalled on memory over the last 10 s.
        line = Path("/proc/pressure/memory").read_text().splitlines()[0]
        avg10 = float(line.split("avg10=")[1].split()[0])
        return "critical" if avg10 >= 40 else "warn" if avg10 >= 10 else "normal"
    except (OSError, IndexError, ValueError):
        return "normal"


@dataclass(frozen=True)
class HotFacts:
    name: str
    nbytes: int
    dirty: bool
    busy: bool


@dataclass(frozen=True)
class Limits:
    max_hot: int
    cache_budget: int
    min_available: int


def memory_short(reading: Reading, limits: Limits) -> bool:
    """Free memory below the floor, or the system says critical: one more cache goes per tick."""
    return reading.available < limits.min_available or reading.level == "critical"


def choose_evictions(hot: list[HotFacts], limits: Limits, reading: Reading | None = None) -> list[str]:
    """Agents to evict, in order, to bring the hot set within limits.

    `hot` is in LRU order, oldest first. Busy agents are never chosen; among the rest, clean
    agents go before dirty ones (they cost no write), oldest first. Under pressure (free
    memory below the floor, or the system says critical) one more agent goes per call, so
    the caller's periodic tick gives hysteresis instead of dropping everything at once.
    """
    candidates = sorted((a for a in hot if not a.busy), key=lambda a: a.dirty)  # stable: LRU kept
    count, total = len(hot), sum(a.nbytes for a in hot)
    chosen: list[str] = []
    for a in candidates:
        if count <= limits.max_hot and total <= limits.cache_budget:
            break
        chosen.append(a.name)
        count, total = count - 1, total - a.nbytes
    if reading is not None and memory_short(reading, limits):
        rest = [a for a in candidates if a.name not in chosen]
        if rest:
            chosen.append(rest[0].name)
    return chosen
