"""agentd's on/off environment switches (AGENTD_BLAS, AGENTD_WARMUP, ...), read one way."""

from __future__ import annotations

OFF_WORDS = ("off", "0", "no", "false")


def switched_off(value: str | None) -> bool:
    """Whether a switch's value turns its feature off: "off", "0", "no" or "false", any case."""
    return (value or "").strip().lower() in OFF_WORDS
