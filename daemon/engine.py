"""The model, its tokenizer and fingerprints, and the model steps every turn is made of.

The engine owns no agent state: it renders conversations to tokens, rewinds and
prefills caller-owned KV caches (the final chunk of a prompt gives the first token's
logits), and runs one decode step for one or several rows.
A turn is driven through these steps by `sequence.py`/`stepper.py`. Callers must use it
from a single thread (the daemon's MLX thread).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

# Files whose bytes decide how text becomes tokens; a change to any invalidates caches.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


class ModelLoadError(Exception):
    """The model folder is missing or cannot be loaded; the message says which and why."""


class ContextTooLong(ValueError):
    """A prompt that leaves the model no room to reply; refused before any prefill."""


# Tokenizers write "no limit" as a huge sentinel (1e30); anything above this is not a context.
_PLAUSIBLE_CONTEXT = 10**8


def context_length(model_dir: Path, tokenizer=None) -> int | None:
    """The most tokens the model attends to: the smallest of its config's position limit
    and the tokenizer's `model_max_length`; None when neither states one."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limits = []
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                limits.append(cfg[key])
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _PLAUSIBLE_CONTEXT:
        limits.append(tok_max)
    return min(limits) if limits else None


def finish_text(detok, on_token: Callable[[str], None] | None = None) -> str:
    """Flush a streaming detokenizer and return the whole reply text.

    A reply cut (max_tokens, the end of the context) inside a multi-byte character leaves
    that character's first bytes unflushed, and `finalize` decodes them as U+FFFD. They
    are not text: the replacement characters at the very end are dropped, from what is
    streamed and from what is stored alike.
    """
    detok.finalize()
    tail = detok.last_segment
    kept = tail.rstrip("\ufffd")
    if on_token is not None and kept:
        on_token(kept)
    return detok.text[: len(detok.text) - (len(tail) - len(kept))]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _sampled_file_digest(path: Path, h: "hashlib._Hash", samples: int = 64, chunk: int = 1 << 16) -> None:
    """Hash size, head and evenly spaced chunks: tells weight files apart without reading gigabytes."""
    size = path.stat().st_size
    h.update(path.name.encode() + b"\0" + str(size).encode())
    with open(path, "rb") as f:
        offsets = {0} | {size * i // samples for i in range(1, samples)} | {max(0, size - chunk)}
        for off in sorted(offsets):
            f.seek(off)
            h.update(f.read(chunk))


def model_fingerprint(model_dir: Path) -> str:
    """Config and weights. Weights are sampled, not read whole, so a 12B model starts fast."""
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(model_dir.glob("*.safetensors")):
        _sampled_file_digest(weights, h)
    return h.hexdigest()[:32]


def tokenizer_fingerprint(model_dir: Path, chat_template: str | None) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = model_dir / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    h.update(b"template\0" + (chat_template or "").encode())
    return h.hexdigest()[:32]


class Engine:
    """A loaded model and tokenizer, with the fingerprints cache files are checked against."""

    def __init__(self, model_dir: Path, progress: Callable[[str], None] | None = None, *,
                 kv_bits: int | None = None, kv_group_size: int = 64):
        from mlx_lm import load

        if kv_bits not in (None, 4, 8):
            raise ValueError("kv_bits must be 4, 8 or None")
        # Quantized KV (mlx-lm QuantizedKVCache) for full-attention layers; part of every
        # stored block's fingerprint, so caches of other bits are never loaded.
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ModelLoadError(f"no model at {self.model_dir} (config.json not found)")
        t0 = time.perf_counter()
        try:
            self.model, self.tokenizer = load(str(self.model_dir))
        except Exception as e:  # mlx_lm raises many types; all mean the same to a user
            raise ModelLoadError(f"cannot load the model at {self.model_dir}: {e}") from e
        from .device import prepare_for_device

        # Before the first forward pass: on MLX's CPU backend this swaps quantized layers
        # for float32 ones (the only dtype with a BLAS there); on Metal it changes nothing.
        self.plan = prepare_for_device(self.model)
        self.prefill_chunk = self.plan.prefill_chunk
        self.warmup = None  # agentd.warmup.WarmupReport once the daemon has warmed the GPU kernels
        self.load_s = time.perf_counter() - t0
        self.model_id = self.model_dir.name
        self.dtype = self._compute_dtype()
        self.fingerprint = model_fingerprint(self.model_dir)
        self.tokenizer_fingerprint = tokenizer_fingerprint(
            self.model_dir, getattr(self.tokenizer, "chat_template", None)
        )
        self._last_row = _LastRowSwitch.install(self.model)
        self._warm_template()
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self.context_length = context_length(self.model_dir, getattr(self.tokenizer, "_tokenizer", None))
        self.model_bytes = sum(v.nbytes for _, v in _leaves(self.model.parameters()))

    def _warm_template(self) -> None:
        # The first render in a process compiles the chat template and warms the tokenizer:
        # 7-8 ms of the first turn after every restart (the resumed agent's follow-up is ~170
        # ms), paid here at load instead. Best effort: a template may refuse this conversation.
        try:
            self.render("You are helpful.", [{"role": "user", "content": "Hello."}])
        except Exception:  # jinja raises many types; the real render reports its own
            pass

    def room_for_reply(self, prompt_tokens: int, max_tokens: int, *, who: str = "", advice: str = "") -> int:
        """`max_tokens` cut to what the context leaves after the prompt. A prompt that leaves
        nothing raises ContextTooLong, meant to be called before anything is prefilled."""
        if self.context_length is None:
            return max_tokens
        if prompt_tokens >= self.context_length:
            raise ContextTooLong(
                f"{who}the conversation with this message is {prompt_tokens} tokens and the model's context is "
                f"{self.context_length}, which leaves no room for a reply; nothing was recorded: "
                f"{advice or 'send a shorter message'}"
            )
        return min(max_tokens, self.context_length - prompt_tokens)

    def _compute_dtype(self) -> str:
        """The dtype keys and values are cached in, read off a one-token forward pass.

        Parameters do not tell: a quantized model mixes float16 scales with float32 norms.
        """
        cache = make_prompt_cache(self.model)  # unquantized: the dtype the model computes in
        self.model(mx.array([[0]]), cache=cache)
        state = cache[0].state
        keys = state[0] if isinstance(state[0], mx.array) else None
        return str(keys.dtype).removeprefix("mlx.core.") if keys is not None else "unknown"

    def new_cache(self) -> list:
        cache = make_prompt_cache(self.model)
        if self.kv_bits is None:
            return cache
        return [QuantizedKVCache(self.kv_group_size, self.kv_bits) if type(c) is KVCache else c for c in cache]

    def render(self, system: str, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """The conversation as the model's chat template writes it, in token ids.

        Messages may carry tool calls and tool results (see `agentd.protocol`); `tools` are
        handed to the template, which decides how (and whether) the model sees them.
        """
        convo = ([{"role": "system", "content": system}] if system else []) + [_template_message(m) for m in messages]
        extra = {"tools": tools} if tools else {}
        return list(
            self.tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=True, **extra)
        )

    # ---- the steps a scheduler drives (sequence.py, stepper.py) ----------------------

    def rewind(self, cache: list, cached: int, keep: int) -> tuple[list, int, bool]:
        """Trim a cache holding `cached` tokens back to its first `keep`: (cache, kept, rebuilt).

        A cache that cannot be trimmed back (a sliding window that has wrapped) is replaced
        by a fresh one, and nothing is kept.
        """
        surplus = cached - keep
        if surplus <= 0 or (can_trim_prompt_cache(cache) and trim_prompt_cache(cache, surplus) == surplus):
            return cache, keep, False
        return self.new_cache(), 0, True

    def prefill_range(self, cache: list, tokens: list[int], start: int, stop: int, chunk: int | None = None):
        """Run tokens[start:stop] through the model into `cache`, `chunk` at a time; yields
        how far it has got after each chunk, so callers can report progress or stop."""
        chunk = chunk or self.prefill_chunk
        for lo in range(start, stop, chunk):
            hi = min(lo + chunk, stop)
            self.model(mx.array(tokens[lo:hi])[None], cache=cache)
            mx.eval([c.state for c in cache])
            yield hi

    def last_logits(self, tokens: list[int], cache: list) -> mx.array:
        """Run `tokens` (one row) through the model into `cache` and return the next-token
        logits after the last of them, shape (1, vocab), lazy: the final chunk of a prompt,
        which so gives the turn's first token without a pass of its own. The output head
        (a 576 x 49,152 product on the default model) runs on that one position only, where
        the model's final norm can be told to pass on just its last row."""
        with self._last_row:
            return self.model(mx.array(tokens)[None], cache=cache)[:, -1, :]

    def decode_logits(self, inputs: list[int], cache: list) -> mx.array:
        """One decode step: feed one id per row (a batch cache for several rows), return
        the next-token logits, one row each (lazy)."""
        return self.model(mx.array(inputs)[:, None], cache=cache)[:, -1, :]

    def prefill(self, cache: list, cache_tokens: list[int], tokens: list[int]) -> tuple[list, list[int]]:
        """Extend a cache to hold exactly `tokens` (no reply). Used to warm a rebuilt agent."""
        if not tokens:
            return cache, []
        cache, reuse, _ = self.rewind(cache, len(cache_tokens), common_prefix_len(cache_tokens, tokens))
        for _ in self.prefill_range(cache, tokens, reuse, len(tokens)):
            pass
        return cache, list(tokens)


class _LastRowSwitch:
    """While entered, the model's final norm (`model.model.norm`, the input of the output
    head in mlx-lm's models) keeps only the last position, so the head runs on one row.

    The norm's class is swapped for a subclass in place: the parameter tree, and so the
    weights' names and sizes, stay as loaded. A model whose layout is not that (no such
    norm, or a norm whose result is not the head's only input) is found out at install by
    comparing one forward pass both ways; then the switch does nothing and the head runs on
    every position of the chunk, which is correct, only slower.
    """

    def __init__(self, norm=None):
        self.norm = norm

    @classmethod
    def install(cls, model) -> "_LastRowSwitch":
        norm = getattr(getattr(model, "model", None), "norm", None)
        if not callable(norm) or not hasattr(norm, "__class__") or getattr(norm, "_agentd_last_row", None) is not None:
            return cls()
        base = type(norm)

        def __call__(self, x, *args, **kwargs):
            if self._agentd_last_row and x.ndim == 3:
                x = x[:, -1:, :]
            return base.__call__(self, x, *args, **kwargs)

        try:
            norm.__class__ = type(f"LastRow{base.__name__}", (base,), {"__call__": __call__, "_agentd_last_row": False})
        except TypeError:
            return cls()
        switch = cls(norm)
        if not switch._agrees(model):
            norm.__class__ = base
            return cls()
        return switch

    def _agrees(self, model) -> bool:
        from mlx_lm.models.cache import make_prompt_cache

        ids = mx.array([[1, 2, 3]])
        try:
            full = model(ids, cache=make_prompt_cache(model))[:, -1, :]
            with self:
                last = model(ids, cache=make_prompt_cache(model))
            return last.shape[1] == 1 and bool(mx.allclose(full, last[:, -1, :], rtol=1e-4, atol=1e-4).item())
        except Exception:  # any layout this does not fit: run the head on every row
            return False

    def __enter__(self):
        if self.norm is not None:
            self.norm._agentd_last_row = True
        return self

    def __exit__(self, *exc):
        if self.norm is not None:
            self.norm._agentd_last_row = False
        return False


def _template_message(m: dict) -> dict:
    """A stored message as chat templates expect it: tool-call arguments as a mapping
    (they travel as JSON text, as in OpenAI's API; templates index into them)."""
    out = {"role": m["role"], "content": m["content"]}
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = m[key]
    if m.get("tool_calls"):
        calls = []
        for call in m["tool_calls"]:
            fn = dict(call["function"])
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except (TypeError, ValueError):
                pass  # not JSON: the template gets the text as it came
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    return out


def _leaves(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
