"""Portable agents: export an agent from the store to a bundle, import a bundle into it.

The store side of the `export` and `import` ops (the bytes travel in `core.py`, the format
is `bundle.py`). Both run on the MLX worker, like every other store call. Export works
from the agent's in-memory cache after bringing it up to date with its records, so unsaved
turns travel too and the bundle does not depend on how the store keeps caches on disk;
import decodes the cache in memory and hands it to `AgentStore.adopt`, which saves it
however the store saves caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from . import bundle
from .cachefile import UnsupportedCache
from .records import AgentRecord, AlreadyExists


@dataclass(frozen=True)
class Exported:
    built: bundle.Built
    messages: int
    cache_tokens: int  # 0 when the bundle carries no cache
    cache_reason: str | None  # why not, when it does not


@dataclass(frozen=True)
class Imported:
    name: str
    cache_tokens: int  # 0 when the cache was not imported
    cache_reason: str | None  # why not, when it was not


def model_identity(store) -> dict:
    e = store.engine
    # kv_bits (None: full precision) and its group size decide the cache's classes and arrays.
    return {"id": e.model_id, "fingerprint": e.fingerprint, "tokenizer": e.tokenizer_fingerprint, "dtype": e.dtype,
            "kv_bits": getattr(e, "kv_bits", None), "kv_group_size": getattr(e, "kv_group_size", 64)}


def export_agent(store, name: str) -> Exported:
    """The agent as a bundle, with its cache made current with every recorded turn."""
    rec = store.records.get(name)
    store.warm(name)
    agent, _, _ = store.acquire(name)
    record = {"name": rec.name, "role": rec.role, "system": rec.system, "created_at": rec.created_at,
              "updated_at": rec.updated_at, "messages": rec.messages}
    model = model_identity(store)
    if not agent.tokens:
        return Exported(bundle.build(record, model, None, []), len(rec.messages), 0, "the agent has no context yet")
    try:
        built = bundle.build(record, model, agent.cache, agent.tokens)
    except UnsupportedCache as e:
        # The transcript still travels; the importer rebuilds the cache from it.
        return Exported(bundle.build(record, model, None, [], omitted=str(e)), len(rec.messages), 0, str(e))
    return Exported(built, len(rec.messages), len(agent.tokens), None)


def cache_mismatch(store, b: bundle.Bundle) -> str | None:
    """Why the bundle's cache cannot be used by this daemon's model, or None if it can."""
    if b.cache is None:
        return b.omitted or "the bundle carries no cache"
    here, there = model_identity(store), b.model
    if there["fingerprint"] != here["fingerprint"]:
        return f"it was made by another model ({there['id']}; this daemon runs {here['id']})"
    if there["tokenizer"] != here["tokenizer"]:
        return "it was made with another tokenizer or chat template"
    if there["dtype"] != here["dtype"]:
        return f"it was computed in {there['dtype']}; this daemon's model runs in {here['dtype']}"
    kv_there = (there.get("kv_bits"), there.get("kv_group_size", 64) if there.get("kv_bits") else None)
    kv_here = (here["kv_bits"], here["kv_group_size"] if here["kv_bits"] else None)
    if kv_there != kv_here:
        def kv(bits, group):
            return f"--kv-bits {bits} (group {group})" if bits else "a full-precision cache"
        return f"it was made with {kv(*kv_there)}; this daemon runs {kv(*kv_here)}"
    if b.cache.layout != bundle.LAYOUT:
        return f"its cache layout is {b.cache.layout}; this agentd reads {bundle.LAYOUT}"
    return None


def reference_cache(engine) -> list:
    """A cache of the model holding one token: what a bundle's cache is checked against."""
    cache = engine.new_cache()
    engine.model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def import_agent(store, b: bundle.Bundle, name: str | None = None) -> Imported:
    """Recreate the bundle's agent as `name` (default: its own). Same model, tokenizer and
    dtype: the cache is used as is. Otherwise only the transcript is imported and the
    cache is rebuilt on first use. Raises ProtocolError(INVALID_NAME), AlreadyExists or
    BundleError, having changed nothing."""
    name = bundle.import_name(b, name)
    if store.records.name_taken(name):
        raise AlreadyExists(f"agent {name!r} already exists")
    r = b.record
    rec = AgentRecord(name, r["role"], r["system"], r["created_at"], r["updated_at"], time.time(),
                      len(r["messages"]), r["messages"])
    reason = cache_mismatch(store, b)
    if reason is not None:
        store.adopt(rec, None, [])
        return Imported(name, 0, reason)
    cache = bundle.decode_cache(b.cache, reference_cache(store.engine))
    store.adopt(rec, cache, b.cache.tokens)
    return Imported(name, len(b.cache.tokens), None)
