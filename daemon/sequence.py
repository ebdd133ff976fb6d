"""One turn in flight, as steps a scheduler drives: prepare, prefill chunks, decode steps,
finish.

A `Sequence` owns its turn's cache while it runs, the prompt, the sampler (with its own
random key, so concurrent turns do not share a random stream), the detokenizer and the
stop state. `Stepper` (stepper.py) feeds it prefill budget and the logits of each decode
step, alone or as one row of a batch. The prompt's final chunk gives the first token
(`Engine.last_logits`), so a prompt costs exactly its chunks and no decode pass of its own.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

from .engine import Engine, common_prefix_len, finish_text
from .protocol import Sampling
from .responses import FinishReason

PREFILL, DECODE, DONE = "prefill", "decode", "done"


@dataclass
class Generation:
    """What one turn did to the cache, and how long it took."""

    tokens: list[int]  # generated ids, the stop token excluded
    text: str
    finish_reason: FinishReason
    cache_tokens: list[int]  # exactly the ids whose keys and values the cache now holds
    reused_tokens: int  # prompt ids the cache already held
    prefilled_tokens: int
    rebuilt: bool  # the cache could not be trimmed back and was started over
    ttft_s: float
    decode_s: float
    prompt_tokens: int = 0
    # Where the time to first token went: "waited_ms" from prepared to its first prefill
    # chunk (other turns' steps, jobs), "prefill_ms" in its own prefill chunks.
    timings: dict = field(default_factory=dict)


def make_sampler(sampling: Sampling) -> Callable[[mx.array], mx.array]:
    """Log-probabilities (rows) -> token ids. Greedy at temperature 0; otherwise draws from
    a key of this turn's own (seeded when `seed` is given), so a seeded turn gives the same
    reply whatever else runs beside it."""
    if sampling.temperature == 0:
        return greedy_sampler
    key = mx.random.key(sampling.seed if sampling.seed is not None else random.getrandbits(63))
    inv_temp = 1.0 / sampling.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def _few_rows(engine: Engine) -> int:
    """Rows of a forward pass that agentd's few-row kernels take (products and attention);
    0 where they do not run (a GPU, or MLX's own attention on the CPU)."""
    if getattr(getattr(engine, "plan", None), "attention", "") not in ("agentd", "graph"):
        return 0
    from .fewattn import MAX_QUERY_ROWS

    return MAX_QUERY_ROWS


class Sequence:
    """A turn from its prompt to its reply. Single-threaded: the MLX thread only."""

    def __init__(
        self,
        engine: Engine,
        cache: list,
        cache_tokens: list[int],
        prompt: list[int],
        sampling: Sampling,
        *,
        on_token: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        """Prepare: reuse the longest common prefix of what the cache holds and the prompt,
        trim the rest off (or start a fresh cache when it cannot be trimmed)."""
        if not prompt:
            raise ValueError("empty prompt")
        self.engine = engine
        self.prompt = prompt
        self.sampling = sampling
        self.on_token, self.on_progress = on_token, on_progress
        self.should_stop = should_stop or (lambda: False)
        self.t_start = time.perf_counter()
        # At least the last prompt token must run through the model to give the first logits.
        keep = min(common_prefix_len(cache_tokens, prompt), len(prompt) - 1)
        self.cache, self.reused, self.rebuilt = engine.rewind(cache, len(cache_tokens), keep)
        self.pos = self.reused  # prompt ids the cache holds
        self.phase = PREFILL
        self.sampler = make_sampler(sampling)
        self.detok = engine.tokenizer.detokenizer
        self.detok.reset()
        self.next_input: int | None = None  # the id the next decode step feeds (a reply's last)
        self.fed: list[int] = []  # decode inputs fed so far (replies, each but the last)
        self.generated: list[int] = []
        self.finish: FinishReason = "length"
        self.ttft_s: float | None = None
        self.waited_s: float | None = None  # prepared until its first prefill chunk ran
        self.prefill_s = 0.0  # in prefill chunks, the first token's sampling included
        self.t_decode = 0.0
        self.decode_s = 0.0
        self._stop = sampling.stop
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._emitted = 0  # characters of the reply sent through on_token (with stop strings)
        self._text: str | None = None

    # ---- what the stepper asks ------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.phase == DONE

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.pos

    def check_cancel(self) -> bool:
        """Between steps: end the turn if its client has gone. The cache keeps what it holds."""
        if self.phase != DONE and self.should_stop():
            self.finish = "cancelled"
            self._end()
        return self.done

    def prefill(self, budget: int) -> int:
        """Run up to `budget` prompt ids into the cache, in chunks of the engine's size;
        returns how many ran. The chunk that ends the prompt also samples the first token."""
        end, start, chunk = len(self.prompt), self.pos, self.engine.prefill_chunk
        t0 = time.perf_counter()
        if self.waited_s is None:
            self.waited_s = t0 - self.t_start
        stop = min(end, self.pos + budget)
        few = _few_rows(self.engine)
        while self.pos < stop:
            # A short rest of the prompt (a follow-up's 33-64 new ids) runs as chunks of at
            # most `few` rows, which the CPU's few-row products and attention take: a
            # 41-id prefill in one pass took 278 ms, as 32 + 9 214 ms (60 ids: 440 / 277).
            step = few if few < end - self.pos <= 2 * few else chunk
            hi = min(self.pos + step, stop)
            if hi < end:
                for _ in self.engine.prefill_range(self.cache, self.prompt, self.pos, hi):
                    pass
            else:
                logits = self.engine.last_logits(self.prompt[self.pos:hi], self.cache)
                # The expression a decode step of a turn run by itself samples with.
                first = self.sampler(logits - mx.logsumexp(logits, keepdims=True))
                mx.eval(first, [c.state for c in self.cache])
            self.pos = hi
            if self.on_progress is not None:
                self.on_progress(hi - self.reused, end - self.reused)
        self.prefill_s += time.perf_counter() - t0
        if self.pos == end:
            self.phase = DECODE
            self.accept(first.item())
        return self.pos - start

    def accept(self, token: int) -> None:
        """The token sampled from the logits of feeding `next_input` (none for the first,
        which the prompt's final chunk gave): record, stream, stop."""
        if self.next_input is not None:
            self.fed.append(self.next_input)
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.t_start
            self.t_decode = time.perf_counter()
        if token in self.engine.eos_ids:
            self.finish = "stop"
            self._end()
            return
        self.generated.append(token)
        self.detok.add_token(token)
        if self._stop and self._cut_at_stop():
            self.finish = "stop"
            self._end()
            return
        self._stream()
        if len(self.generated) >= self.sampling.max_tokens:
            self._end()
            return
        self.next_input = token

    # ---- the result ---------------------------------------------------------------

    def result(self) -> Generation:
        assert self.done
        return Generation(
            tokens=self.generated,
            text=self._text if self._text is not None else self.detok.text,
            finish_reason=self.finish,
            cache_tokens=self.cache_tokens,
            reused_tokens=self.reused,
            prefilled_tokens=self.pos - self.reused,
            rebuilt=self.rebuilt,
            ttft_s=self.ttft_s or 0.0,
            decode_s=self.decode_s,
            prompt_tokens=len(self.prompt),
            timings={"waited_ms": (self.waited_s or 0.0) * 1000, "prefill_ms": self.prefill_s * 1000},
        )

    @property
    def cache_tokens(self) -> list[int]:
        """Exactly the ids whose keys and values the cache holds now."""
        return list(self.prompt[: self.pos]) + self.fed

    # ---- internals ----------------------------------------------------------------

    def _end(self) -> None:
        if self.phase == DONE:
            return
        self.phase = DONE
        # finish_text: a reply cut inside a multi-byte character ends before it (no U+FFFD).
        if self._stop:
            full = finish_text(self.detok)
            text = self._text if self._text is not None else full
            self._text = text
            if self.on_token is not None and len(text) > self._emitted:
                self.on_token(text[self._emitted:])
            self._emitted = len(text)
        else:
            self._text = finish_text(self.detok, self.on_token)
        if self.ttft_s is not None:
            self.decode_s = time.perf_counter() - self.t_decode

    def _stream(self) -> None:
        if self.on_token is None:
            return
        if not self._stop:
            if segment := self.detok.last_segment:
                self.on_token(segment)
            return
        # Hold back what could be the start of a stop string until it is known not to be.
        safe = len(self.detok.text) - self._holdback
        if safe > self._emitted:
            self.on_token(self.detok.text[self._emitted:safe])
            self._emitted = safe

    def _cut_at_stop(self) -> bool:
        text = self.detok.text
        start = max(0, self._emitted - self._holdback)
        hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
        if not hits:
            return False
        self._text = text[: min(hits)]
        return True
