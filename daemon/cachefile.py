"""The on-disk form of an agent's KV cache: one safetensors file, verified before use.

Layout: tensors `L{i}.{j}` hold the arrays of layer i's cache state (j walks the state
tree), `tokens` the ids the cache holds. `__metadata__` (str -> str) carries the format
version, the model/tokenizer fingerprints and compute dtype the cache is only valid for,
each layer's cache class and state skeleton (scalars inline, arrays by tensor name), and
a SHA-256 over the metadata and every tensor's dtype, shape and bytes. Classes come back
through REGISTRY, never from a name looked up freely.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import xxhash
from mlx_lm.models import cache as C

from .atomic import atomic_replace, open_for_write, open_regular

FORMAT = "agentd-kv"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024

REGISTRY: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        C.KVCache,
        C.RotatingKVCache,
        C.QuantizedKVCache,
        C.ChunkedKVCache,
        C.ArraysCache,
        C.ConcatenateKVCache,
    )
}
CACHE_LIST = "CacheList"


class CacheFileError(Exception):
    """A cache file that must not be loaded. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class UnsupportedCache(Exception):
    """A cache class this format cannot store; the agent is rebuilt instead of restored."""


@dataclass(frozen=True)
class Expectation:
    """What a cache file must have been made by to be loaded here."""

    model: str
    tokenizer: str
    dtype: str


@dataclass
class LoadedCache:
    cache: list
    tokens: list[int]
    meta: dict[str, str]


# ---- saving ---------------------------------------------------------------------------


def _compact_state(layer) -> tuple:
    """The layer's state with unused preallocated rows cut off, where that is exact.

    KVCache grows in steps of 256 rows; only `offset` of them are real. A rotating cache is
    cut only before it wraps (its rows are then in temporal order); after that its layout
    and `_idx` are kept verbatim so decoding continues bit for bit.
    """
    name = type(layer).__name__
    state = layer.state
    if layer.empty():
        return state
    if name == "KVCache":
        k, v, off = state
        return k[..., :off, :], v[..., :off, :], off
    if name == "QuantizedKVCache":
        k, v, off, gs, bits = state
        cut = lambda t: tuple(x[..., :off, :] for x in t)  # noqa: E731
        return cut(k), cut(v), off, gs, bits
    if name == "ChunkedKVCache":
        k, v, off, size, start = state
        return k[..., : off - start, :], v[..., : off - start, :], off, size, start
    if name == "RotatingKVCache":
        k, v, off, keep, max_size, idx = state
        if idx == off and off < k.shape[2]:
            return k[..., :off, :], v[..., :off, :], off, keep, max_size, idx
    return state


def _encode(node, prefix: str, tensors: dict[str, mx.array]):
    """State tree -> JSON skeleton; arrays are moved into `tensors` and named."""
    if isinstance(node, mx.array):
        tensors[prefix] = mx.contiguous(node)
        return {"t": prefix}
    if isinstance(node, (list, tuple)):
        return {"l": [_encode(x, f"{prefix}.{i}", tensors) for i, x in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"v": node}
    raise UnsupportedCache(f"cannot store a cache state value of type {type(node).__name__}")


def _encode_layer(layer, prefix: str, tensors: dict[str, mx.array]) -> dict:
    name = type(layer).__name__
    if name == CACHE_LIST:
        return {"class": name, "children": [_encode_layer(c, f"{prefix}.{i}", tensors) for i, c in enumerate(layer.caches)]}
    if name not in REGISTRY:
        raise UnsupportedCache(f"cache class {name} is not supported by format v{FORMAT_VERSION}")
    return {"class": name, "empty": layer.empty(), "state": _encode(_compact_state(layer), prefix, tensors)}


def encode_cache(cache: list) -> tuple[list[dict], dict[str, mx.array]]:
    """The cache as a JSON-ready layer layout plus the (evaluated, contiguous) arrays it names.

    The one encoder of cache objects: cache files and agent bundles (`agentd.bundle`) both
    store this layout. Raises UnsupportedCache for a class outside REGISTRY.
    """
    tensors: dict[str, mx.array] = {}
    layers = [_encode_layer(layer, f"L{i}", tensors) for i, layer in enumerate(cache)]
    mx.eval(list(tensors.values()))
    return layers, tensors


def _digest(meta: dict[str, str], tensors: dict[str, Any], algorithm: str = "sha256") -> str:
    """A hash over metadata (sans checksum) and each tensor's name, dtype, shape and bytes.

    Format v1 files use SHA-256; window files (v2) xxh3-128, which keeps up with memory.
    """
    h = hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "agentd.checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_bytes_of(t))
    return h.hexdigest()


def _bytes_of(t: mx.array) -> memoryview:
    # The buffer protocol has no bfloat16; its bytes are the same read as uint16.
    return memoryview(t.view(mx.uint16) if t.dtype == mx.bfloat16 else t)


def save_cache(
    path: Path,
    cache: list,
    tokens: list[int],
    expect: Expectation,
    *,
    agent: str = "",
    extra_meta: dict[str, str] | None = None,
    replace: Callable[[Path, Callable[[Path], None]], None] = atomic_replace,
) -> int:
    """Write `cache` (holding exactly `tokens`) to `path` atomically. Returns the file size."""
    layers, tensors = encode_cache(cache)
    tensors["tokens"] = mx.array(tokens if tokens else [], dtype=mx.int32)
    mx.eval(list(tensors.values()))
    meta = {
        "agentd.format": FORMAT,
        "agentd.format_version": str(FORMAT_VERSION),
        "agentd.model": expect.model,
        "agentd.tokenizer": expect.tokenizer,
        "agentd.dtype": expect.dtype,
        "agentd.agent": agent,
        "agentd.n_tokens": str(len(tokens)),
        "agentd.layers": json.dumps(layers, separators=(",", ":")),
        "agentd.saved_at": repr(time.time()),
        **(extra_meta or {}),
    }
    meta["agentd.checksum"] = _digest(meta, tensors)

    def write(tmp: Path) -> None:
        # Through a Python file: a failed write raises OSError with its errno (ENOSPC says
        # "No space left on device"); given a path, mlx raises a RuntimeError without it.
        with open_for_write(tmp) as f:
            mx.save_safetensors(f, tensors, meta)

    replace(Path(path), write)
    return Path(path).stat().st_size


# ---- window files: the per-agent layers a block cannot share --------------------------

WINDOW_FORMAT = "agentd-kv-window"


def encode_layers(layers: dict[int, Any]) -> tuple[dict[str, mx.array], str]:
    """Layers (by index) -> tensors and the JSON skeleton; public for bundle writers."""
    tensors: dict[str, mx.array] = {}
    skeleton = {str(i): _encode_layer(layer, f"L{i}", tensors) for i, layer in layers.items()}
    mx.eval(list(tensors.values()))
    return tensors, json.dumps(skeleton, separators=(",", ":"))


def decode_layers(tensors: dict[str, mx.array], skeleton: str) -> dict[int, Any]:
    """The inverse of encode_layers; raises CacheFileError on a layout it cannot rebuild."""
    try:
        return {int(i): _decode_layer(spec, tensors) for i, spec in json.loads(skeleton).items()}
    except CacheFileError:
        raise
    except Exception as e:
        raise CacheFileError("corrupt", f"layer layout unreadable ({e})") from e


def save_layers(path: Path, layers: dict[int, Any], meta: dict[str, str],
                replace: Callable[[Path, Callable[[Path], None]], None] = atomic_replace) -> int:
    """Write some layers' verbatim state (sliding windows) atomically, xxh3-checked."""
    tensors, skeleton = encode_layers(layers)
    meta = {**meta, "agentd.format": WINDOW_FORMAT, "agentd.layers": skeleton}
    meta["agentd.checksum"] = _digest(meta, tensors, "xxh3")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            mx.save_safetensors(f, tensors, meta)

    replace(Path(path), write)
    return Path(path).stat().st_size


def load_layers(path: Path, expect_meta: dict[str, str]) -> dict[int, Any]:
    """Load a window file whose checksum holds and whose metadata has `expect_meta`."""
    path = Path(path)
    meta = read_header(path)
    if meta.get("agentd.format") != WINDOW_FORMAT or any(meta.get(k) != v for k, v in expect_meta.items()):
        raise CacheFileError("corrupt", f"{path.name}: not the window file its manifest names")
    try:
        tensors = mx.load(str(path))
    except Exception as e:
        raise CacheFileError("truncated", f"{path.name}: tensors unreadable ({e})") from e
    mx.eval(list(tensors.values()))
    if _digest(meta, tensors, "xxh3") != meta.get("agentd.checksum"):
        raise CacheFileError("checksum", f"{path.name}: checksum mismatch (the file is corrupt)")
    return decode_layers(tensors, meta["agentd.layers"])


# ---- loading --------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read without loading any tensor."""
    try:
        # Never a FIFO or a device (opening one could block forever), never through a link.
        with open_regular(path) as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CacheFileError("truncated", f"{path.name}: file is truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CacheFileError("corrupt", f"{path.name}: header length {n} is implausible")
            body = f.read(n)
    except OSError as e:
        raise CacheFileError("unreadable", f"{path.name}: {e.strerror or e}") from e
    if len(body) < n:
        raise CacheFileError("truncated", f"{path.name}: file is truncated (header cut short)")
    try:
        header = json.loads(body)
        meta = header["__metadata__"]
        if not isinstance(meta, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise CacheFileError("corrupt", f"{path.name}: header is not valid safetensors metadata") from e
    return meta


def check_compatible(meta: dict[str, str], expect: Expectation, name: str) -> None:
    if meta.get("agentd.format") != FORMAT:
        raise CacheFileError("corrupt", f"{name}: not an agentd cache file")
    version = meta.get("agentd.format_version")
    if version != str(FORMAT_VERSION):
        raise CacheFileError("version", f"{name}: format version {version}, this agentd reads {FORMAT_VERSION}")
    if meta.get("agentd.model") != expect.model:
        raise CacheFileError("model", f"{name}: made by another model ({meta.get('agentd.model')})")
    if meta.get("agentd.tokenizer") != expect.tokenizer:
        raise CacheFileError("tokenizer", f"{name}: made with another tokenizer or chat template")
    if meta.get("agentd.dtype") != expect.dtype:
        raise CacheFileError("dtype", f"{name}: made with dtype {meta.get('agentd.dtype')}, model runs {expect.dtype}")


def _decode(node, tensors: dict[str, mx.array]):
    if "t" in node:
        return tensors[node["t"]]
    if "l" in node:
        return [_decode(x, tensors) for x in node["l"]]
    return node["v"]


def _decode_layer(spec: dict, tensors: dict[str, mx.array]):
    name = spec["class"]
    if name == CACHE_LIST:
        return C.CacheList(*[_decode_layer(c, tensors) for c in spec["children"]])
    cls = REGISTRY.get(name)
    if cls is None:
        raise CacheFileError("corrupt", f"unknown cache class {name!r}")
    state = _decode(spec["state"], tensors)
    # An empty cache's state holds Nones that from_state cannot take; build it via __init__.
    return make_empty(cls, state) if spec.get("empty") else cls.from_state(state)


def decode_cache(layers: Any, tensors: dict[str, mx.array]) -> list:
    """The inverse of encode_cache. Classes come only from REGISTRY; a layout that is not
    well-formed (unknown class, missing tensor, wrong state arity) raises CacheFileError."""
    try:
        if not isinstance(layers, list):
            raise TypeError("the layer layout is not a list")
        return [_decode_layer(spec, tensors) for spec in layers]
    except CacheFileError:
        raise
    except Exception as e:  # KeyError, TypeError, ValueError, RecursionError from a bad layout
        raise CacheFileError("corrupt", f"layer layout unreadable ({type(e).__name__}: {e})") from e


def make_empty(cls, state):
    """An empty layer cache of `cls`, rebuilt from the scalars its state kept."""
    if cls is C.RotatingKVCache:
        _, _, _, keep, max_size, _ = state
        return C.RotatingKVCache(max_size=max_size, keep=keep)
    if cls is C.ChunkedKVCache:
        return C.ChunkedKVCache(state[3])
    if cls is C.QuantizedKVCache:
        return C.QuantizedKVCache(group_size=state[3], bits=state[4])
    if cls is C.ArraysCache:
        return C.ArraysCache(len(state[0]))
    return cls()


def load_cache(path: Path, expect: Expectation) -> LoadedCache:
    """Load and verify; raises CacheFileError with the reason rather than return a bad cache."""
    path = Path(path)
    meta = read_header(path)
    check_compatible(meta, expect, path.name)
    tensors = _verified_tensors(path, meta)
    try:
        layers = json.loads(meta["agentd.layers"])
    except (KeyError, ValueError) as e:
        raise CacheFileError("corrupt", f"{path.name}: layer layout unreadable ({e})") from e
    try:
        cache = decode_cache(layers, tensors)
    except CacheFileError as e:
        raise CacheFileError(e.reason, f"{path.name}: {e}") from e
    tokens = tensors["tokens"].tolist()
    if str(len(tokens)) != meta.get("agentd.n_tokens"):
        raise CacheFileError("corrupt", f"{path.name}: token count does not match")
    return LoadedCache(cache=cache, tokens=tokens, meta=meta)


def read_verified_header(path: Path) -> dict[str, str]:
    """The metadata of an agentd cache file whose checksum holds, whichever model made it."""
    path = Path(path)
    meta = read_header(path)
    if meta.get("agentd.format") != FORMAT:
        raise CacheFileError("corrupt", f"{path.name}: not an agentd cache file")
    _verified_tensors(path, meta)
    return meta


def _verified_tensors(path: Path, meta: dict[str, str]) -> dict[str, mx.array]:
    try:
        # Read on the CPU stream: the checksum below reads every byte on the host, and on
        # CUDA (managed memory) arrays a GPU stream had loaded would first migrate back to
        # the host page by page; the GPU's first use moves them once, after verification.
        tensors = mx.load(str(path), stream=mx.cpu)
    except Exception as e:  # mlx reports truncation and bad offsets as generic errors
        raise CacheFileError("truncated", f"{path.name}: tensors unreadable ({e})") from e
    if not isinstance(tensors, dict) or "tokens" not in tensors:
        raise CacheFileError("corrupt", f"{path.name}: tensors missing")
    mx.eval(list(tensors.values()))
    if _digest(meta, tensors) != meta.get("agentd.checksum"):
        raise CacheFileError("checksum", f"{path.name}: checksum mismatch (the file is corrupt)")
    return tensors


def cache_nbytes(cache: list) -> int:
    total = 0
    for layer in cache:
        try:
            total += layer.nbytes
        except (NotImplementedError, AttributeError):
            pass
    return total
