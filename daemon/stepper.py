"""One scheduling step over the turns in flight: a decode forward pass for every decoding
sequence (batched where their caches can merge) and a bounded budget of prefill.

Batching uses mlx-lm's `BatchKVCache`: `merge_with_room` left-pads the rows' caches into
one (as its `merge`, with room for the next tokens), `extend` adds rows, and rows that
finish in a step leave together (`extract_with_room` each, then one `filter`). The batch is
re-formed only when the set of decoding sequences changes, not every step. A sequence whose cache is not all
plain `KVCache` layers (a sliding window's `RotatingKVCache`, a `QuantizedKVCache`) decodes
alone in the same step. When only one sequence decodes it runs unbatched, the same
computation as a turn that runs by itself, so a lone turn is token-exact.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from .engine import Engine
from .sequence import DECODE, PREFILL, Sequence

# Prefill tokens per step while other turns are decoding or waiting to prefill: small
# enough that a short turn beside a long prefill keeps answering (each of its decode steps
# waits for at most this much prefill), large enough that the prefill still moves at most
# of its full speed. benchmarks/concurrency.py measures the trade.
INTERLEAVED_PREFILL_TOKENS = int(os.environ.get("AGENTD_INTERLEAVED_PREFILL", "32"))  # env: benchmark sweeps


def batchable(cache: list | None) -> bool:
    return cache is not None and all(type(layer) is KVCache for layer in cache)


class BatchGroup:
    """Decoding sequences whose caches live merged in one batch cache, one row each."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs: list[Sequence] = []
        self.cache: list = []
        self.add(seqs)

    def __contains__(self, seq: Sequence) -> bool:
        return any(s is seq for s in self.seqs)

    def add(self, seqs: list[Sequence]) -> None:
        merged = [merge_with_room([s.cache[i] for s in seqs]) for i in range(len(seqs[0].cache))]
        if not self.seqs:
            self.cache = merged
        else:
            for layer, new in zip(self.cache, merged):
                layer.extend(new)
        for s in seqs:
            s.cache = None  # the rows now live in the batch; a copy would double the memory
            self.seqs.append(s)

    def remove(self, leaving: list[Sequence]) -> None:
        """Give each of `leaving` its own cache back (exactly its tokens) and drop their rows,
        all in one filter: rows that finish in the same step leave together."""
        rows = [j for j, s in enumerate(self.seqs) if any(s is x for x in leaving)]
        for j in rows:
            self.seqs[j].cache = [extract_with_room(layer, j) for layer in self.cache]
        keep = [j for j in range(len(self.seqs)) if j not in rows]
        for layer in self.cache:
            layer.filter(mx.array(keep))
        self.seqs = [self.seqs[j] for j in keep]

    def dissolve(self) -> None:
        for j, seq in enumerate(self.seqs):
            seq.cache = [extract_with_room(layer, j) for layer in self.cache]
        self.seqs, self.cache = [], []


def _room(tokens: int) -> int:
    """Buffer length for `tokens` with room for at least one more, in mlx-lm's steps of 256."""
    return (tokens // BatchKVCache.step + 1) * BatchKVCache.step


def merge_with_room(caches: list[KVCache]) -> BatchKVCache:
    """mlx-lm's `BatchKVCache.merge` (rows left-padded to the longest), in a buffer with
    room for the next tokens: merge's buffer is exactly as long as the longest row, so the
    first decode step of every new batch allocated a larger one and copied all rows again."""
    lengths = [c.offset for c in caches]
    longest = max(lengths)
    if longest == 0:
        return BatchKVCache([0] * len(caches))
    first = next(c for c in caches if c.keys is not None)
    _, heads, _, k_dim = first.keys.shape
    cap = _room(longest)
    keys = mx.zeros((len(caches), heads, cap, k_dim), first.keys.dtype)
    values = mx.zeros((len(caches), heads, cap, first.values.shape[3]), first.values.dtype)
    padding = [longest - n for n in lengths]
    for i, (pad, c) in enumerate(zip(padding, caches)):
        if c.offset:
            keys[i : i + 1, :, pad:longest] = c.keys[..., : c.offset, :]
            values[i : i + 1, :, pad:longest] = c.values[..., : c.offset, :]
    batch = BatchKVCache(padding)
    batch.keys, batch.values = keys, values
    batch.offset = batch.offset + longest
    batch._idx = longest
    return batch


def extract_with_room(batch: BatchKVCache, row: int) -> KVCache:
    """mlx-lm's `BatchKVCache.extract` (the row's own tokens, padding dropped), in a buffer
    with room for the next turn's tokens, as a KVCache that never left the turn keeps."""
    pad = batch.left_padding[row].item()
    n = batch._idx - pad
    cache = KVCache()
    if n <= 0:
        return cache
    cap = _room(n)
    for name in ("keys", "values"):
        src = getattr(batch, name)
        buf = mx.zeros((1, src.shape[1], cap, src.shape[3]), src.dtype)
        buf[..., :n, :] = src[row : row + 1, :, pad : batch._idx]
        setattr(cache, name, buf)
    cache.offset = n
    return cache


class Stepper:
    """Drives sequences through their steps; owns the batch group between steps."""

    def __init__(self, engine: Engine, interleaved_prefill: int = INTERLEAVED_PREFILL_TOKENS):
        self.engine = engine
        self.interleaved_prefill = interleaved_prefill
        self.group: BatchGroup | None = None
        self.batched_steps = 0  # decode passes that carried more than one row (status shows it)
        self.max_batch = 0  # the most rows one pass has carried

    def step(self, seqs: list[Sequence]) -> None:
        """One step: cancelled sequences end, decoding ones get one token, prefilling ones
        share the prefill budget (shortest remaining first, so a short prompt beside a long
        one is not made to wait for it)."""
        for s in seqs:
            if s.check_cancel():
                self.release(s)
        decoding = [s for s in seqs if s.phase == DECODE]
        prefilling = [s for s in seqs if s.phase == PREFILL]
        if decoding:
            self._decode(decoding)
        # Nobody decoding: prefill at full speed (the shortest first, so it starts decoding
        # soonest). Someone decoding: a small budget, so their next token is not held up.
        budget = self.interleaved_prefill if decoding else self.engine.prefill_chunk
        for s in sorted(prefilling, key=lambda s: s.prefill_left):
            if budget <= 0:
                break
            budget -= s.prefill(budget)

    def release(self, seq: Sequence) -> None:
        """Before a finished sequence leaves: its cache back out of the batch (and a batch
        of one left behind goes back to the unbatched path)."""
        self._leave_group([seq])

    def _leave_group(self, leaving: list[Sequence]) -> None:
        leaving = [s for s in leaving if self.group is not None and s in self.group]
        if not leaving:
            return
        if len(self.group.seqs) - len(leaving) < 2:
            self.group.dissolve()  # every row extracted once; no filter of rows about to leave
            self.group = None
        else:
            self.group.remove(leaving)

    def run_alone(self, seq: Sequence) -> None:
        """Drive one sequence to its end (the library path: AgentStore.chat)."""
        while not seq.done:
            self.step([seq])
        self.release(seq)

    # ---- decoding -----------------------------------------------------------------

    def _decode(self, decoding: list[Sequence]) -> None:
        in_group = [s for s in decoding if self.group is not None and s in self.group]
        mergeable = [s for s in decoding if s in in_group or batchable(s.cache)]
        if len(mergeable) >= 2:
            joining = [s for s in mergeable if not (self.group is not None and s in self.group)]
            if self.group is None:
                self.group = BatchGroup(joining)
            elif joining:
                self.group.add(joining)
        elif self.group is not None:
            self.group.dissolve()
            self.group = None
        grouped = self.group.seqs if self.group is not None else []
        solo = [s for s in decoding if not any(s is g for g in grouped)]

        pending: list[tuple[list[Sequence], mx.array]] = []
        if grouped:
            logits = self.engine.decode_logits([s.next_input for s in grouped], self.group.cache)
            pending.append((grouped, self._sample_rows(grouped, logits)))
            self.batched_steps += 1
            self.max_batch = max(self.max_batch, len(grouped))
        for s in solo:
            logits = self.engine.decode_logits([s.next_input], s.cache)
            # The exact expression of a turn run by itself (the resume guarantee).
            pending.append(([s], s.sampler(logits - mx.logsumexp(logits, keepdims=True))))
        mx.eval([tokens for _, tokens in pending])
        for rows, tokens in pending:
            for s, token in zip(rows, tokens.tolist()):
                s.accept(token)
        # Rows that finished in this step leave the batch together (one filter, not one each).
        if grouped:
            self._leave_group([s for s in grouped if s.done])

    @staticmethod
    def _sample_rows(rows: list[Sequence], logits: mx.array) -> mx.array:
        if all(s.sampling.temperature == 0 for s in rows):
            # Greedy needs no normalisation: the largest logit is the largest log-probability.
            # The logsumexp over the vocabulary (49,152 exps a row, one at a time on MLX's CPU
            # backend) cost a batched step of 3 rows 2.3-2.9 ms of 97-118 (one process, the
            # two alternated). A lone turn keeps its expression (`_decode`): it is token-exact.
            return mx.argmax(logits, axis=-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.concatenate([s.sampler(logprobs[i : i + 1]).reshape(1) for i, s in enumerate(rows)])


def generate(engine: Engine, cache: list, cache_tokens: list[int], prompt: list[int], sampling=None, **callbacks):
    """One lone turn outside any store: bring `cache` from `cache_tokens` to `prompt` and
    decode a reply. Returns (the cache to keep, maybe a new object; its Generation)."""
    from .protocol import Sampling

    seq = Sequence(engine, cache, cache_tokens, prompt, sampling or Sampling(), **callbacks)
    Stepper(engine).run_alone(seq)
    return seq.cache, seq.result()
