"""Agent bundles: one file that carries an agent (record, transcript, KV cache) elsewhere.

Layout (all integers little-endian):

    0        8 bytes  magic b"\\x89agentd\\n"
    8        4 bytes  u32 format version (FORMAT_VERSION)
    12       8 bytes  u64 H, the header's length (<= MAX_HEADER_BYTES)
    20       8 bytes  u64 D, the tensor data's length (<= MAX_DATA_BYTES)
    28       H bytes  the header: UTF-8 JSON (see `build_header`)
    28+H     D bytes  every tensor's bytes, back to back in the header's table order
    28+H+D  32 bytes  SHA-256 of every byte before it

A bundle is untrusted input. `BundleReader` takes it in pieces (an upload): the preamble's
sizes are checked against the limits as soon as its 28 bytes are in, a byte past the
declared end is refused, the header is parsed and checked as soon as it is complete, and
nothing is allocated beyond the bytes actually received. Nothing is executed or unpickled:
the header is JSON, tensors are raw bytes with a dtype from an allow-list, and cache
classes come back only through `cachefile.REGISTRY` (`cachefile.decode_cache`, the same
decoder cache files use; `cachefile.encode_cache` is the one encoder).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import __version__, cachefile
from .protocol import MAX_ROLE_CHARS, MAX_TEXT_BYTES, ProtocolError, check_messages, validate_agent_name

MAGIC = b"\x89agentd\n"  # the high byte and newline catch text-mode and non-bundle files
FORMAT = "agentd-agent"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIQQ")
DIGEST_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a transcript of a full 128k-token context is ~1 MB
MAX_DATA_BYTES = 64 * 1024**3
MAX_TENSORS = 4096
MAX_NDIM = 8
# The cache layout inside is cachefile's; a bundle from an agentd whose layout differs
# still carries its transcript, but its cache is not used.
LAYOUT = f"{cachefile.FORMAT}/{cachefile.FORMAT_VERSION}"

DTYPES: dict[str, mx.Dtype] = {
    str(d).removeprefix("mlx.core."): d
    for d in (mx.float32, mx.float16, mx.bfloat16, mx.int8, mx.int16, mx.int32, mx.int64,
              mx.uint8, mx.uint16, mx.uint32, mx.uint64, mx.bool_)
}


class BundleError(Exception):
    """A bundle that is refused. `reason` is a short tag; the message is one line."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # within the data section
    nbytes: int


@dataclass(frozen=True)
class CacheSection:
    tokens: list[int]
    layers: list  # cachefile's layer layout (checked when decoded)
    tensors: tuple[TensorSpec, ...]
    layout: str
    data: memoryview  # the data section


@dataclass(frozen=True)
class Bundle:
    """A bundle whose sizes, header and checksum held. The cache is still bytes."""

    record: dict  # name, role, system, created_at, updated_at, messages
    model: dict  # id, fingerprint, tokenizer, dtype
    cache: CacheSection | None
    omitted: str | None  # why the exporter left the cache out, if it did
    size: int
    sha256: str  # of the whole file


# ---- writing ---------------------------------------------------------------------------


@dataclass
class Built:
    """An encoded bundle: `pieces` concatenated are the file."""

    pieces: list[memoryview]
    size: int
    sha256: str


def build(record: dict, model: dict, cache: list | None, tokens: list[int], omitted: str | None = None) -> Built:
    """Encode an agent. `cache` holds exactly `tokens` (None or no tokens: no cache section).

    Raises cachefile.UnsupportedCache for a cache class the layout cannot store; the caller
    then builds without the cache. Runs on the MLX thread (it evaluates arrays).
    """
    section, arrays = None, []
    if cache is not None and tokens:
        layers, tensors = cachefile.encode_cache(cache)
        table, offset = [], 0
        for name in sorted(tensors):
            t = tensors[name]
            flat = t.view(mx.uint8).reshape(-1) if t.nbytes else mx.zeros((0,), dtype=mx.uint8)
            arrays.append(flat)
            table.append({"name": name, "dtype": str(t.dtype).removeprefix("mlx.core."),
                          "shape": list(t.shape), "offset": offset, "nbytes": t.nbytes})
            offset += t.nbytes
        mx.eval(arrays)
        section = {"layout": LAYOUT, "n_tokens": len(tokens), "tokens": list(tokens), "layers": layers,
                   "tensors": table}
    header = json.dumps({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "daemon_version": __version__,
        "exported_at": time.time(),
        "agent": record,
        "model": model,
        "cache": section,
        "cache_omitted": omitted if section is None else None,
    }, separators=(",", ":"), ensure_ascii=False).encode()
    data_len = sum(a.nbytes for a in arrays)
    pieces = [memoryview(PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), data_len) + header)]
    pieces += [memoryview(a) for a in arrays if a.nbytes]
    inner = hashlib.sha256()
    for piece in pieces:
        inner.update(piece)
    trailer = inner.digest()
    whole = inner.copy()
    whole.update(trailer)
    pieces.append(memoryview(trailer))
    return Built(pieces, sum(p.nbytes for p in pieces), whole.hexdigest())


# ---- reading ---------------------------------------------------------------------------


class BundleReader:
    """Takes a bundle in pieces (`feed`), then `finish()` returns the checked Bundle.

    Every refusal is a BundleError, raised by the first piece that shows it: sizes over the
    limits or past the declared end by the preamble, a bad header as soon as it is complete.
    Memory grows only with the bytes received.
    """

    def __init__(self, max_bytes: int = PREAMBLE.size + MAX_HEADER_BYTES + MAX_DATA_BYTES + DIGEST_BYTES):
        self.max_bytes = max_bytes
        self._buf = bytearray()  # preamble, header and data section: everything but the trailer
        self._trailer = bytearray()
        self._hash = hashlib.sha256()  # of _buf: what the trailer must equal
        self.received = 0
        self._total: int | None = None
        self._header_len = 0
        self._header: dict | None = None

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        limit = self._total if self._total is not None else self.max_bytes
        if self.received + len(view) > limit:
            raise BundleError("size", f"the bundle is longer than {'its header says' if self._total else 'the limit of'} "
                                      f"{limit} bytes")
        self.received += len(view)
        while len(view):
            if self._total is None:
                part = view[:PREAMBLE.size - len(self._buf)]
                self._take(part)
                if len(self._buf) == PREAMBLE.size:
                    self._read_preamble()
            elif len(self._buf) < self._total - DIGEST_BYTES:
                part = view[:self._total - DIGEST_BYTES - len(self._buf)]
                self._take(part)
                if self._header is None and len(self._buf) >= PREAMBLE.size + self._header_len:
                    raw = bytes(self._buf[PREAMBLE.size:PREAMBLE.size + self._header_len])
                    self._header = parse_header(raw, self._total - PREAMBLE.size - self._header_len - DIGEST_BYTES)
            else:
                part = view
                self._trailer += part
            view = view[len(part):]

    def _take(self, part: memoryview) -> None:
        self._hash.update(part)
        self._buf += part

    def _read_preamble(self) -> None:
        magic, version, header_len, data_len = PREAMBLE.unpack_from(self._buf)
        if magic != MAGIC:
            raise BundleError("format", "not an agentd agent bundle")
        if version != FORMAT_VERSION:
            raise BundleError("version", f"bundle format version {version}; this agentd reads version {FORMAT_VERSION}")
        if header_len > MAX_HEADER_BYTES:
            raise BundleError("size", f"the bundle's header would be {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
        if data_len > MAX_DATA_BYTES:
            raise BundleError("size", f"the bundle's cache would be {data_len} bytes; the limit is {MAX_DATA_BYTES}")
        total = PREAMBLE.size + header_len + data_len + DIGEST_BYTES
        if total > self.max_bytes:
            raise BundleError("size", f"the bundle would be {total} bytes; the limit is {self.max_bytes}")
        if self.received > total:
            raise BundleError("size", f"the bundle is longer than its header says ({total} bytes)")
        self._total, self._header_len = total, header_len

    def finish(self) -> Bundle:
        """The checked bundle, once every declared byte is in and the checksum holds."""
        if self._total is None or self.received < self._total:
            have = f"{self.received} of {self._total}" if self._total is not None else f"{self.received}"
            raise BundleError("truncated", f"the bundle is truncated ({have} bytes)")
        if bytes(self._trailer) != self._hash.digest():
            raise BundleError("checksum", "checksum mismatch: the bundle is corrupt")
        assert self._header is not None
        whole = self._hash.copy()  # the whole file's SHA-256 without a second pass over it
        whole.update(self._trailer)
        h = self._header
        data = memoryview(self._buf)[PREAMBLE.size + self._header_len:]
        c = h["cache"]
        cache = None
        if c is not None:
            tensors = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                            for t in c["tensors"])
            cache = CacheSection(list(c["tokens"]), c["layers"], tensors, c["layout"], data)
        return Bundle(h["agent"], h["model"], cache, h.get("cache_omitted"), self._total, whole.hexdigest())


def read_bytes(blob: bytes, max_bytes: int | None = None) -> Bundle:
    """A whole bundle at once (tests, tools)."""
    reader = BundleReader(max_bytes) if max_bytes is not None else BundleReader()
    reader.feed(blob)
    return reader.finish()


# ---- checks of the header (no mlx) ------------------------------------------------------


def _bad(message: str) -> BundleError:
    return BundleError("corrupt", f"bundle header: {message}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _text(d: dict, key: str, *, max_bytes: int = MAX_TEXT_BYTES, max_chars: int | None = None) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise _bad(f"{key} must be a string")
    if max_chars is not None and len(v) > max_chars:
        raise _bad(f"{key} is {len(v)} characters; the limit is {max_chars}")
    if len(v.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _bad(f"{key} is over {max_bytes} bytes")
    return v


def _time(d: dict, key: str) -> float:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(f"{key} must be a number")
    return float(v)


def parse_header(raw: bytes, data_len: int) -> dict:
    """The header's JSON, checked field by field, its tensor table against the `data_len`
    bytes of the data section; raises BundleError."""
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise _bad("not a JSON object")
    if h.get("format") != FORMAT:
        raise BundleError("format", "not an agentd agent bundle")
    if h.get("format_version") != FORMAT_VERSION:
        raise BundleError("version", f"bundle format version {h.get('format_version')!r}; this agentd reads {FORMAT_VERSION}")
    a = h.get("agent")
    if not isinstance(a, dict):
        raise _bad("agent must be an object")
    if not isinstance(a.get("name"), str):
        raise _bad("agent name must be a string")
    messages = a.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages must be a list")
    for i, m in enumerate(messages):
        try:
            check_messages([m])  # the same rules as messages arriving in a turn
        except ProtocolError as e:
            raise _bad(f"message {i}: {e.message}") from None
    h["agent"] = {
        "name": a["name"],
        "role": _text(a, "role", max_chars=MAX_ROLE_CHARS),
        "system": _text(a, "system"),
        "created_at": _time(a, "created_at"),
        "updated_at": _time(a, "updated_at"),
        "messages": messages,
    }
    model = h.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("id", "fingerprint", "tokenizer", "dtype")):
        raise _bad("model must be an object of id, fingerprint, tokenizer and dtype strings")
    omitted = h.get("cache_omitted")
    if omitted is not None and not isinstance(omitted, str):
        raise _bad("cache_omitted must be a string or null")
    c = h.get("cache")
    used = _check_cache_header(c) if c is not None else 0
    if used != data_len:
        raise BundleError("corrupt", f"bundle header: its tensors take {used} bytes, the file holds {data_len}")
    return h


def _check_cache_header(c: Any) -> int:
    """Checks the cache section; returns the bytes its tensors take."""
    if not isinstance(c, dict):
        raise _bad("cache must be an object or null")
    if not isinstance(c.get("layout"), str):
        raise _bad("cache layout must be a string")
    tokens = c.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < 2**31 for t in tokens):
        raise _bad("cache tokens must be a list of token ids")
    if c.get("n_tokens") != len(tokens) or not tokens:
        raise BundleError("corrupt", f"bundle header: n_tokens {c.get('n_tokens')!r} does not match the {len(tokens)} token ids")
    if not isinstance(c.get("layers"), list):
        raise _bad("cache layers must be a list")
    table = c.get("tensors")
    if not isinstance(table, list) or len(table) > MAX_TENSORS:
        raise _bad(f"cache tensors must be a list of at most {MAX_TENSORS}")
    offset, names = 0, set()
    for t in table:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t["name"] in names:
            raise _bad("each tensor needs a unique name")
        names.add(t["name"])
        dtype, shape = t.get("dtype"), t.get("shape")
        if dtype not in DTYPES:
            raise _bad(f"tensor {t['name']!r} has dtype {dtype!r}, not one this agentd reads")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(n) and 0 <= n < 2**40 for n in shape):
            raise _bad(f"tensor {t['name']!r} has an invalid shape")
        nbytes = math.prod(shape) * DTYPES[dtype].size
        if t.get("nbytes") != nbytes:
            raise BundleError("corrupt", f"bundle header: tensor {t['name']!r} claims {t.get('nbytes')!r} bytes; "
                                         f"its shape and dtype make {nbytes}")
        if t.get("offset") != offset:
            raise BundleError("corrupt", f"bundle header: tensor {t['name']!r} is not where the table says")
        offset += nbytes
    return offset


# ---- the cache, decoded and checked against the model (mlx) ---------------------------


def decode_cache(section: CacheSection, reference: list) -> list:
    """The bundle's cache objects, checked against `reference` (a cache of the importing
    model holding one token): same classes, array ranks, dtypes and every dimension but
    the token axis, the same window sizes, and every layer's offset equal to the token
    count. Raises BundleError; a bundle that passes can be extended by the model."""
    arrays = {}
    for t in section.tensors:
        raw = section.data[t.offset:t.offset + t.nbytes]
        flat = mx.array(raw, dtype=mx.uint8) if t.nbytes else mx.zeros((0,), dtype=mx.uint8)
        arrays[t.name] = flat.view(DTYPES[t.dtype]).reshape(t.shape)
    try:
        cache = cachefile.decode_cache(section.layers, arrays)
    except cachefile.CacheFileError as e:
        raise BundleError("corrupt", f"bundle cache: {e}") from None
    if len(cache) != len(reference):
        raise BundleError("corrupt", f"bundle cache has {len(cache)} layers; the model has {len(reference)}")
    for i, (layer, ref) in enumerate(zip(cache, reference)):
        _check_layer(layer, ref, len(section.tokens), f"layer {i}")
    mx.eval([layer.state for layer in cache])
    return cache


def _check_layer(layer, ref, n_tokens: int, where: str) -> None:
    if type(layer) is not type(ref):
        raise BundleError("corrupt", f"bundle cache: {where} is a {type(layer).__name__}, the model makes {type(ref).__name__}")
    if type(ref).__name__ == cachefile.CACHE_LIST:
        if len(layer.caches) != len(ref.caches):
            raise BundleError("corrupt", f"bundle cache: {where} has the wrong number of parts")
        for j, (a, b) in enumerate(zip(layer.caches, ref.caches)):
            _check_layer(a, b, n_tokens, f"{where}.{j}")
        return
    state, ref_state = _flat(layer.state), _flat(ref.state)
    if len(state) != len(ref_state):
        raise BundleError("corrupt", f"bundle cache: {where} has a state of the wrong shape")
    for x, r in zip(state, ref_state):
        if isinstance(r, mx.array):
            ok = (isinstance(x, mx.array) and x.ndim == r.ndim and x.dtype == r.dtype
                  and all(a == b for k, (a, b) in enumerate(zip(x.shape, r.shape)) if k != 2))
        else:
            ok = type(x) is type(r)
        if not ok:
            raise BundleError("corrupt", f"bundle cache: {where} does not fit this model's cache")
    if hasattr(ref, "max_size") and (layer.max_size, layer.keep) != (ref.max_size, ref.keep):
        raise BundleError("corrupt", f"bundle cache: {where} has window {layer.max_size}, the model {ref.max_size}")
    offset = getattr(layer, "offset", n_tokens)
    if offset != n_tokens:
        raise BundleError("corrupt", f"bundle cache: {where} holds {offset} tokens, the header says {n_tokens}")
    keys = getattr(layer, "keys", None)
    if type(layer).__name__ == "KVCache" and keys is not None and keys.shape[2] < offset:
        raise BundleError("corrupt", f"bundle cache: {where} has fewer rows than tokens")
    idx = getattr(layer, "_idx", None)
    if idx is not None and keys is not None and not 0 <= idx <= keys.shape[2]:
        raise BundleError("corrupt", f"bundle cache: {where} has its write position outside its buffer")


def _flat(state) -> list:
    out = []
    for x in state if isinstance(state, (list, tuple)) else [state]:
        out.extend(_flat(x) if isinstance(x, (list, tuple)) else [x])
    return out


def import_name(bundle: Bundle, name: str | None) -> str:
    """The name the agent gets: `name` if given, else the bundle's (validated either way:
    ProtocolError INVALID_NAME)."""
    if name is not None:
        return validate_agent_name(name)
    try:
        return validate_agent_name(bundle.record["name"])
    except ProtocolError as e:
        raise ProtocolError(e.code, f"the bundle's {e.message}; import it under another name") from None
