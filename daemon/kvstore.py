"""The cache repository: every agent's KV cache on disk as shared blocks, a tail and a manifest.

```
caches/blocks/<id>.kvb                 full 256-token blocks, content-addressed (blocks.py)
caches/agents/<name>/manifest.json     the agent: record copy, token ids, block ids, tail, window
caches/agents/<name>/tail.<gen>.kvt    rows after the last full block, appended segment by segment
caches/agents/<name>/window.<gen>.safetensors   sliding-window layers, verbatim (Gemma 3)
caches/<name>.safetensors              a format v1 file: loaded once, then converted
```

A save writes the blocks the store does not have yet, appends the new tail rows to the
tail file (beyond what the durable manifest names, so a crash never touches named bytes),
writes the window file under a new generation name when there are sliding-window layers,
and then the manifest, atomically. A file is alive only while a durable manifest names it:
stale tails and windows go after their manifest is replaced, unnamed blocks are garbage
(collected at start, after a delete, after a save that dropped blocks, and by `gc`).

Not thread-safe except `stats()` and `info()`, which read snapshots replaced whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_replace, fsync_dir, full_fsync, is_partial
from .blocks import ROOT, BlockError, BlockStore
from .cachefile import CacheFileError, Expectation, load_cache, load_layers, read_verified_header, save_layers
from .kvrows import RowLayout, RowsError, RowTarget, digest, is_row_layer, layout_of, read_buffers, row_buffers
from .kvrows import _views as cache_views
from .kvrows import write_buffers
from .protocol import ProtocolError, validate_agent_name

log = logging.getLogger("agentd.kvstore")

FORMAT = "agentd-kv"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LEGACY_SUFFIX = ".safetensors"

# (agent, reason, message, where the refused file went)
ProblemSink = Callable[[str, str, str, str], None]


@dataclass(frozen=True)
class KVSettings:
    """How KV is stored: `bits` None (the model's dtype) or 8/4 (mlx-lm QuantizedKVCache)."""

    bits: int | None = None
    group_size: int = 64
    block_tokens: int = 256

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size if self.bits else None,
                "block_tokens": self.block_tokens}


def cache_fingerprint(expect: Expectation, kv: KVSettings) -> str:
    """What a block's rows depend on besides the tokens: model, dtype and the KV setting."""
    key = json.dumps({"model": expect.model, "dtype": expect.dtype, **kv.to_json()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class SaveReport:
    bytes_written: int
    blocks_written: int
    blocks_shared: int


@dataclass
class Loaded:
    cache: list
    tokens: list[int]
    migrated: bool = False  # came from a v1 file: save it now to convert it


def _manifest_digest(m: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True).encode()).hexdigest()


class CacheRepository:
    def __init__(self, caches_dir: Path, expect: Expectation, new_cache: Callable[[], list],
                 kv: KVSettings = KVSettings(), *, replace: Callable = atomic_replace,
                 on_problem: ProblemSink | None = None):
        self.dir = Path(caches_dir)
        self.agents_dir = self.dir / "agents"
        self.quarantine_dir = self.dir / "quarantine"
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        self.expect, self.kv, self.new_cache = expect, kv, new_cache
        self.fingerprint = cache_fingerprint(expect, kv)
        self.blocks = BlockStore(self.dir / "blocks", self.fingerprint, kv.block_tokens,
                                 replace=replace, quarantine_dir=self.quarantine_dir)
        self._replace = replace
        self.on_problem = on_problem or (lambda *a: None)
        self.classes = [type(layer).__name__ for layer in new_cache()]
        # Prefix sharing needs every layer to be a pure function of the prefix: a sliding
        # window's state at a block boundary is not stored anywhere, so such models share nothing.
        self.shareable = all(is_row_layer(layer) for layer in new_cache())
        self._layout: RowLayout | None = None
        self._manifests: dict[str, dict] = {}
        self._stats: dict = {}
        self._info: dict[str, dict] = {}
        self._scan()
        self.gc()

    @property
    def replace(self) -> Callable:
        return self._replace

    @replace.setter
    def replace(self, fn: Callable) -> None:
        self._replace = self.blocks.replace = fn

    # ---- paths --------------------------------------------------------------------

    def agent_dir(self, name: str) -> Path:
        return self.agents_dir / name

    def manifest_path(self, name: str) -> Path:
        return self.agent_dir(name) / MANIFEST

    def legacy_path(self, name: str) -> Path:
        return self.dir / (name + LEGACY_SUFFIX)

    def has(self, name: str) -> bool:
        return name in self._manifests or self.legacy_path(name).exists()

    def names(self) -> list[str]:
        return sorted(self._manifests)

    # ---- saving -------------------------------------------------------------------

    def save(self, name: str, cache: list, tokens: list[int], record_json: str) -> SaveReport | None:
        """Make `cache` (holding exactly `tokens`) the agent's durable cache. None: nothing to save."""
        n, B = len(tokens), self.kv.block_tokens
        if n == 0:
            return None
        window_layers = {i: layer for i, layer in enumerate(cache) if not is_row_layer(layer)}
        layout = layout_of(cache) if len(window_layers) < len(cache) else None
        views = cache_views(cache, layout) if layout else []
        self._layout = self._layout or layout
        prev = self._manifests.get(name)
        written = new_blocks = 0
        ids = self.blocks.chain(tokens) if layout else []
        parent = ROOT
        for i, bid in enumerate(ids):
            if not self.blocks.has(bid):
                written += self.blocks.write(bid, parent, tokens[i * B:(i + 1) * B], layout,
                                             row_buffers(views, i * B, (i + 1) * B))
                new_blocks += 1
            parent = bid
        adir = self.agent_dir(name)
        if not adir.exists():
            adir.mkdir(parents=True)
            fsync_dir(self.agents_dir)
        gen = prev["gen"] + 1 if prev else 1
        tail, w = self._save_tail(adir, prev, tokens, len(ids) * B, views, gen) if layout else (None, 0)
        written += w
        window = None
        if window_layers:
            wfile = f"window.{gen}.safetensors"
            written += save_layers(adir / wfile, window_layers, {"agentd.agent": name, "agentd.gen": str(gen),
                                                                   "agentd.n_tokens": str(n)}, self._replace)
            window = {"file": wfile}
        m = {
            "format": FORMAT, "version": FORMAT_VERSION, "agent": name,
            "model": self.expect.model, "tokenizer": self.expect.tokenizer, "dtype": self.expect.dtype,
            "kv": self.kv.to_json(), "fingerprint": self.fingerprint, "classes": self.classes,
            "layout": layout.to_json() if layout else None, "gen": gen, "saved_at": time.time(),
            "n_tokens": n, "tokens": list(map(int, tokens)), "blocks": ids, "tail": tail, "window": window,
            "record": record_json,
        }
        m["checksum"] = _manifest_digest(m)
        data = json.dumps(m, separators=(",", ":")).encode()
        self._write_file(adir / MANIFEST, [data])
        written += len(data)
        self._manifests[name] = m
        # The new manifest is durable: what only the old one named can go.
        keep = {MANIFEST, tail and tail["file"], window and window["file"]}
        for p in adir.iterdir():
            if p.name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.legacy_path(name).unlink()  # converted: the v1 file is no longer needed
            fsync_dir(self.dir)
        if prev and set(prev["blocks"]) - set(ids):
            self.gc()
        else:
            self._refresh()
        return SaveReport(written, new_blocks, len(ids) - new_blocks)

    def _save_tail(self, adir: Path, prev: dict | None, tokens: list[int], start: int, views, gen: int):
        """Rows [start, len(tokens)) in the tail file: appended when the old tail is a prefix."""
        n = len(tokens)
        if n == start:
            return None, 0
        pt = prev and prev.get("tail")
        if pt and pt["start"] == start and prev["fingerprint"] == self.fingerprint:
            end = pt["start"] + sum(seg[1] for seg in pt["segments"])
            if end <= n and prev["tokens"][start:end] == tokens[start:end] and (adir / pt["file"]).exists():
                segments = [list(s) for s in pt["segments"]]
                if end == n:
                    return {"file": pt["file"], "start": start, "segments": segments}, 0
                rows = row_buffers(views, end, n)
                offset = segments[-1][2] + segments[-1][3]
                fd = os.open(adir / pt["file"], os.O_WRONLY)
                try:
                    # Past the last byte the durable manifest names: a crash here tears nothing named.
                    wrote = write_buffers(fd, rows, offset)
                    full_fsync(fd)
                finally:
                    os.close(fd)
                segments.append([end, n - end, offset, wrote, digest(rows, f"{end}:{n - end}".encode())])
                return {"file": pt["file"], "start": start, "segments": segments}, wrote
        rows = row_buffers(views, start, n)
        tfile = f"tail.{gen}.kvt"
        wrote = self._write_file(adir / tfile, rows)
        return {"file": tfile, "start": start, "segments": [[start, n - start, 0, wrote,
                                                              digest(rows, f"{start}:{n - start}".encode())]]}, wrote

    def _write_file(self, path: Path, buffers: list) -> int:
        written = [0]

        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                written[0] = write_buffers(fd, buffers)
            finally:
                os.close(fd)

        self._replace(path, write)
        return written[0]

    # ---- loading ------------------------------------------------------------------

    def load(self, name: str) -> Loaded | None:
        """The agent's cache, verified: whole, or its longest intact prefix, or None."""
        m = self._manifests.get(name)
        if m is None:
            legacy = self.legacy_path(name)
            if not legacy.exists():
                return None
            try:
                lc = load_cache(legacy, self.expect)
                return Loaded(lc.cache, lc.tokens, migrated=True)
            except CacheFileError as e:
                self._problem(name, e.reason, str(e), self._move_aside(legacy, name, e.reason))
                return None
        try:
            self._check_compatible(m)
        except CacheFileError as e:
            self._drop_manifest(name, e)
            return None
        cache = self.new_cache()
        tokens = m["tokens"]
        good = self._fill(name, m, cache)
        return Loaded(cache, tokens[:good]) if good else None

    def _check_compatible(self, m: dict) -> None:
        name = m.get("agent", "?")
        for key, reason in (("model", "model"), ("tokenizer", "tokenizer"), ("dtype", "dtype")):
            if m.get(key) != getattr(self.expect, key):
                raise CacheFileError(reason, f"{name}: cache made with another {key} ({m.get(key)})")
        if m.get("kv") != self.kv.to_json() or m.get("fingerprint") != self.fingerprint:
            raise CacheFileError("kv-bits", f"{name}: cache stored with other KV settings ({m.get('kv')})")
        if m.get("classes") != self.classes:
            raise CacheFileError("layout", f"{name}: cache layers do not match the model's")

    def _fill(self, name: str, m: dict, cache: list) -> int:
        """Read blocks, tail and window into `cache`; returns how many tokens it holds."""
        tokens, n, B = m["tokens"], m["n_tokens"], self.kv.block_tokens
        if len(tokens) != n or self.blocks.chain(tokens) != m["blocks"]:
            self._drop_manifest(name, CacheFileError("corrupt", f"{name}: manifest's blocks do not match its tokens"))
            return 0
        good = 0
        if m["layout"] is not None:
            layout = RowLayout.from_json(m["layout"])
            self._layout = self._layout or layout
            target = RowTarget(layout, n)
            good = self._read_blocks(name, m["blocks"], tokens, layout, target)
            if good == len(m["blocks"]) * B and m["tail"]:
                good = self._read_tail(name, m, layout, target, good)
            target.install(cache, good)
        if m["window"] is not None:
            if good < n and m["layout"] is not None:
                return 0  # a window holds the state after all n tokens: useless for a prefix
            path = self.agent_dir(name) / m["window"]["file"]
            try:
                layers = load_layers(path, {"agentd.agent": name, "agentd.gen": str(m["gen"]),
                                            "agentd.n_tokens": str(n)})
            except CacheFileError as e:
                self._problem(name, e.reason, str(e), self._move_aside(path, name, e.reason))
                return 0
            for i, layer in layers.items():
                cache[i] = layer
            good = n
        return good

    def _read_blocks(self, name: str, ids: list[str], tokens: list[int], layout: RowLayout, target: RowTarget) -> int:
        B, parent = self.kv.block_tokens, ROOT
        for i, bid in enumerate(ids):
            try:
                self.blocks.read_into(bid, parent, tokens[i * B:(i + 1) * B], layout, target.buffers(i * B, (i + 1) * B))
            except BlockError as e:
                moved = self.blocks.quarantine(bid, e.reason) if e.reason != "missing" else ""
                self._problem(name, e.reason, f"{e}; the tokens from {i * B} on are prefilled again", moved)
                return i * B
            parent = bid
        return len(ids) * B

    def _read_tail(self, name: str, m: dict, layout: RowLayout, target: RowTarget, good: int) -> int:
        path = self.agent_dir(name) / m["tail"]["file"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            self._problem(name, "missing", f"{name}: tail file unreadable ({e.strerror or e})", "")
            return good
        try:
            for at, count, offset, size, checksum in m["tail"]["segments"]:
                rows = target.buffers(at, at + count)
                try:
                    read_buffers(fd, rows, offset)
                except RowsError:
                    self._problem(name, "truncated", f"{name}: tail is truncated at token {at}", "")
                    return at
                if digest(rows, f"{at}:{count}".encode()) != checksum:
                    self._problem(name, "checksum", f"{name}: tail checksum mismatch at token {at}", "")
                    return at
                good = at + count
        finally:
            os.close(fd)
        return good

    # ---- sharing ------------------------------------------------------------------

    def stored_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the store has as consecutive blocks."""
        if not self.shareable:
            return 0
        k = 0
        for bid in self.blocks.chain(tokens):
            if not self.blocks.has(bid):
                break
            k += 1
        return k * self.kv.block_tokens

    def load_prefix(self, tokens: list[int], at_least: int) -> Loaded | None:
        """A fresh cache holding the longest stored block prefix of `tokens`, if it is
        longer than `at_least` tokens (what the caller's cache already holds)."""
        n = self.stored_prefix(tokens)
        if n <= at_least or self._layout is None and not self._learn_layout():
            return None
        ids = self.blocks.chain(tokens[:n])
        target = RowTarget(self._layout, n)
        good = self._read_blocks("(shared)", ids, tokens, self._layout, target)
        if good <= at_least:
            return None
        cache = self.new_cache()
        target.install(cache, good)
        return Loaded(cache, list(tokens[:good]))

    def _learn_layout(self) -> bool:
        for m in self._manifests.values():
            if m.get("layout") and m.get("fingerprint") == self.fingerprint:
                self._layout = RowLayout.from_json(m["layout"])
                return True
        return False

    def fork(self, source: str, name: str, record_json: str) -> bool:
        """Give `name` a copy of `source`'s durable cache: same blocks, copied tail and window."""
        m = self._manifests.get(source)
        if m is None or name in self._manifests or m["window"]:
            return False  # a window file is per agent by name: a fork of such a model prefills
        src, adir = self.agent_dir(source), self.agent_dir(name)
        adir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.agents_dir)
        if m["tail"]:
            self._replace(adir / m["tail"]["file"], lambda tmp: shutil.copyfile(src / m["tail"]["file"], tmp))
        new = {**m, "agent": name, "record": record_json, "saved_at": time.time()}
        new["checksum"] = _manifest_digest(new)
        self._write_file(adir / MANIFEST, [json.dumps(new, separators=(",", ":")).encode()])
        self._manifests[name] = new
        self._refresh()
        return True

    # ---- removal and garbage ------------------------------------------------------

    def delete(self, name: str) -> None:
        """Forget the agent's cache: the manifest first (it holds the record copy), then the rest."""
        self._manifests.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(name).unlink()
            fsync_dir(self.agent_dir(name))
        self._drop_dir(name)
        with contextlib.suppress(FileNotFoundError):
            self.legacy_path(name).unlink()
            fsync_dir(self.dir)
        self.gc()

    def gc(self) -> dict:
        """Remove every block no durable manifest names. Returns what was reclaimed."""
        self.blocks.rescan()
        live = {b for m in self._manifests.values() for b in m["blocks"]}
        garbage = [b for b in self.blocks.sizes() if b not in live]
        freed = self.blocks.remove(garbage)
        if garbage:
            log.info("gc: removed %d block(s), %d bytes", len(garbage), freed)
        self._refresh()
        return {"removed_blocks": len(garbage), "freed_bytes": freed}

    def _drop_dir(self, name: str) -> None:
        shutil.rmtree(self.agent_dir(name), ignore_errors=True)
        fsync_dir(self.agents_dir)

    def _drop_manifest(self, name: str, err: CacheFileError) -> None:
        moved = self._move_aside(self.manifest_path(name), name, err.reason)
        self._problem(name, err.reason, str(err), moved)
        self._manifests.pop(name, None)
        self._drop_dir(name)
        self.gc()

    def _move_aside(self, path: Path, name: str, reason: str) -> str:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"{name}.{int(time.time() * 1000)}.{reason}.{path.name}"
        try:
            os.replace(path, dest)
            return str(dest)
        except OSError as e:
            log.error("agent %s: cannot move %s aside: %s", name, path.name, e)
            return str(path)

    def _problem(self, name: str, reason: str, message: str, moved_to: str) -> None:
        log.warning("agent %s: cache refused (%s), prefilling instead: %s", name, reason, message)
        self.on_problem(name, reason, message, moved_to)

    # ---- start-up, recovery, accounting -------------------------------------------

    def _scan(self) -> None:
        for p in self.dir.iterdir():
            if p.is_file() and is_partial(p):
                with contextlib.suppress(OSError):
                    p.unlink()
        for adir in sorted(self.agents_dir.iterdir()):
            name = adir.name
            try:
                validate_agent_name(name)
            except ProtocolError:
                continue
            if not adir.is_dir():
                continue
            for p in adir.iterdir():
                if is_partial(p):
                    with contextlib.suppress(OSError):
                        p.unlink()
            path = adir / MANIFEST
            if not path.exists():
                self._drop_dir(name)  # a first save or a delete that a crash cut short
                continue
            try:
                m = json.loads(path.read_bytes())
                if not isinstance(m, dict) or m.get("checksum") != _manifest_digest(m):
                    raise ValueError("checksum mismatch")
                if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION or m.get("agent") != name:
                    raise ValueError("not this agent's manifest of a version this agentd reads")
                self._manifests[name] = m
            except (OSError, ValueError) as e:
                reason = "checksum" if "checksum" in str(e) else "corrupt"
                self._problem(name, reason, f"{name}: manifest refused ({e})", self._move_aside(path, name, reason))
                self._drop_dir(name)

    def recoverable(self) -> list[tuple[str, str | None, Path | None]]:
        """(name, record copy, v1 file) for every stored agent, v1 files' copies read lazily."""
        out = [(n, m.get("record"), None) for n, m in self._manifests.items()]
        out += [(p.name[: -len(LEGACY_SUFFIX)], None, p) for p in sorted(self.dir.glob("*" + LEGACY_SUFFIX))
                if p.is_file() and not is_partial(p) and p.name[: -len(LEGACY_SUFFIX)] not in self._manifests]
        return out

    @staticmethod
    def legacy_record(path: Path) -> str | None:
        return read_verified_header(path).get("agentd.record")

    def _refresh(self) -> None:
        sizes = self.blocks.sizes()
        refs: dict[str, int] = {}
        info = {}
        for name, m in self._manifests.items():
            own = 0
            adir = self.agent_dir(name)
            for part in (m["tail"], m["window"]):
                with contextlib.suppress(OSError):
                    own += (adir / part["file"]).stat().st_size if part else 0
            for b in m["blocks"]:
                refs[b] = refs.get(b, 0) + 1
            info[name] = {"tokens": m["n_tokens"], "bytes": own + sum(sizes.get(b, 0) for b in m["blocks"]),
                          "own_bytes": own, "saved_at": m["saved_at"]}
        self._info = info
        self._stats = {
            "blocks": len(sizes),
            "block_bytes": sum(sizes.values()),
            "shared_blocks": sum(1 for b, r in refs.items() if r > 1 and b in sizes),
            "shared_bytes": sum(sizes[b] for b, r in refs.items() if r > 1 and b in sizes),
            "saved_by_sharing_bytes": sum(sizes[b] * (r - 1) for b, r in refs.items() if b in sizes),
            "agent_bytes": sum(i["own_bytes"] for i in info.values()),
            "garbage_blocks": sum(1 for b in sizes if b not in refs),
            "garbage_bytes": sum(s for b, s in sizes.items() if b not in refs),
            "legacy_files": sum(1 for _ in self.dir.glob("*" + LEGACY_SUFFIX)),
            "block_tokens": self.kv.block_tokens,
            "kv_bits": self.kv.bits,
        }

    def stats(self) -> dict:
        return dict(self._stats)

    def info(self, name: str) -> dict | None:
        return self._info.get(name)
