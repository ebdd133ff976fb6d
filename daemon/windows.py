"""Sliding-window layers across a turn: a copy of their state from before it, so that a reply
whose text does not re-tokenize to the ids that were generated costs its own tokens at the
next turn, not a rebuild of the whole conversation.

The next turn's prompt is the transcript rendered again, and the reply is stored as text. A
reply's text does not always render back to the ids generated (a template that trims the
content, as Gemma 3's does; tokens that decode and re-encode differently): then the prompt
parts from the cache inside the reply. A full-attention cache is trimmed back to where they
agree. A sliding window (`RotatingKVCache`) that has wrapped cannot be: the keys it dropped
are gone, and the next turn started over from an empty cache -- thousands of tokens of
prefill for a few tokens of disagreement. So a turn of a model with such layers keeps a copy
of their state once its prompt is in the cache and before the reply (`WindowGuard`; only
when the reply can wrap them), and at its end, if the transcript rendered again leaves the
cache, the agent goes back to that state and prefills the reply as rendered, a few dozen
tokens: its cache then holds exactly its transcript.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache

from .engine import common_prefix_len

log = logging.getLogger("agentd.windows")


@dataclass
class WindowSnapshot:
    tokens: list[int]  # what the cache held when the copy was taken
    layers: dict[int, RotatingKVCache]  # layer index -> a copy of that layer


class WindowGuard:
    """One turn's copy of the sliding windows, taken when its prompt has been prefilled (the
    sequence reports it through `on_progress`) or at once if there was nothing to prefill."""

    def __init__(self, render_after: Callable[[str], list[int]], reply_tokens: int):
        self.render_after = render_after  # the transcript this turn leaves, given its reply, in ids
        self.reply_tokens = reply_tokens
        self.seq = None
        self.snap: WindowSnapshot | None = None

    def progress(self, inner: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        def on_progress(done: int, total: int) -> None:
            if done >= total:
                self.take()
            if inner is not None:
                inner(done, total)
        return on_progress

    def attach(self, seq) -> None:
        self.seq = seq
        if seq.prefill_left == 0:
            self.take()

    def take(self) -> None:
        if self.seq is not None and self.snap is None:
            self.snap = snapshot(self.seq.cache, self.seq.cache_tokens, self.reply_tokens)

    def settle(self, engine, cache: list, held: list[int], reply: str) -> tuple[list, list[int]]:
        """At the turn's end: the cache and tokens for the agent to keep (see `settle`); when it
        went back to the copy, the reply is prefilled as the transcript renders it."""
        rendered = self.render_after(reply)
        cache, tokens, back = settle(cache, held, rendered, self.snap)
        if back:
            log.debug("the reply did not render back to its ids; prefilling it again from token %d", len(tokens))
            cache, tokens = engine.prefill(cache, tokens, rendered)
        return cache, tokens


def has_windows(cache: list | None) -> bool:
    return bool(cache) and any(isinstance(layer, RotatingKVCache) for layer in cache)


def _may_wrap(layer, new_tokens: int) -> bool:
    return isinstance(layer, RotatingKVCache) and layer.keys is not None and layer.offset + new_tokens > layer.max_size


def snapshot(cache: list, tokens: list[int], new_tokens: int) -> WindowSnapshot | None:
    """A copy of the sliding-window layers of a cache holding `tokens`, if a turn adding up to
    `new_tokens` (prompt and reply) can leave them unable to trim back; else None."""
    if not tokens or not any(_may_wrap(layer, new_tokens) for layer in cache):
        return None
    layers = {}
    for i, layer in enumerate(cache):
        if isinstance(layer, RotatingKVCache) and layer.keys is not None:
            twin = copy.copy(layer)
            # New buffers, not references: the turn updates its layers' arrays in place.
            twin.keys, twin.values = layer.keys + 0, layer.values + 0
            layers[i] = twin
    mx.eval([(t.keys, t.values) for t in layers.values()])
    return WindowSnapshot(list(tokens), layers)


def settle(cache: list, held: list[int], rendered: list[int], snap: WindowSnapshot | None):
    """After a turn: `(cache, tokens, back)`, what the agent should keep. The next prompt starts
    with `rendered`; when it extends what the cache holds, or the cache can be trimmed back,
    the cache stays as it is (`back` False); when only the state from before the turn still
    agrees with it, the agent goes back to that state (`back` True: sliding windows from the
    copy, the other layers trimmed), which `rendered` then extends."""
    if snap is None or common_prefix_len(held, rendered) == len(held) or can_trim_prompt_cache(cache):
        return cache, held, False
    n = len(snap.tokens)
    if common_prefix_len(snap.tokens, rendered) < n or common_prefix_len(held, snap.tokens) < n:
        return cache, held, False  # it parts before the turn began: the next turn starts over
    if not all(i in snap.layers or (layer.is_trimmable() and layer.offset >= n) for i, layer in enumerate(cache)):
        return cache, held, False
    restored = list(cache)
    for i, layer in enumerate(cache):
        if i in snap.layers:
            restored[i] = snap.layers[i]
        else:
            layer.trim(layer.offset - n)
    return restored, list(snap.tokens), True
