"""The cache repository: where agents' KV caches live on disk, and what happens to files
that cannot be trusted. Storage: shared token blocks (blocks.py), a manifest and a tail
per agent (kvstore.py); format v1 single files still load and are converted.

Interface (what the rest of the daemon uses):

    save(name, cache, tokens, record) -> bool   False: this cache class cannot be stored
    load(name) -> Loaded | Refusal | None        None: nothing stored; Refusal: moved aside
    stored_prefix(tokens), load_prefix(tokens, at_least)   blocks another agent stored
    fork(source, name, record), delete(name), gc()          durable (directories fsynced)
    info(name) -> ColdInfo, stats()              from snapshots: safe from any thread
    recover_records(records)                     agents whose record was lost come back
    problems                                     the last refused files, for status

A save writes the blocks the store does not have yet, appends the new tail rows, writes
the window file (sliding-window layers) under a new generation name, then the manifest,
atomically. A tail that a turn filled up to a block boundary becomes that block (the
rest of its rows and a trailer appended, the file hard-linked into blocks/), so a row is
written once, whether it ends in a block or not. A file is alive only while a durable manifest names it: stale tails and
windows go once their manifest is replaced, unnamed blocks are garbage (collected at
start, after a delete, after a save that dropped blocks, and by `gc`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_replace, fsync_dir, is_temp
from .blocks import ROOT, BlockError, BlockStore, block_error
from .cachefile import CacheFileError, Expectation, UnsupportedCache, load_cache, load_layers, read_verified_header
from .cachefile import save_layers
from .kvrows import RowLayout, RowsError, Segment, install, is_row_layer, layout_of, row_buffers
from .kvrows import _views as cache_views
from .kvstore import MANIFEST, KVSettings, append_rows, cache_fingerprint, durable_tail, encode_manifest, parse_manifest
from .kvstore import open_tail, save_tail
from .kvstore import FORMAT, FORMAT_VERSION, ManifestError, record_from_json, record_to_json, summarize  # noqa: F401
from .kvstore import write_file
from .protocol import ProtocolError, validate_agent_name
from .quarantine import CacheProblem, Quarantine
from .records import AgentRecord, Records
from .restore_reads import read_pieces

log = logging.getLogger("agentd.cacherepo")

LEGACY_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Refusal:
    """Something stored that was not loaded (corrupt, another model, ...); already moved aside."""

    reason: str
    message: str


@dataclass(frozen=True)
class ColdInfo:
    tokens: int = 0
    bytes: int = 0
    saved_at: float | None = None


@dataclass
class Loaded:
    cache: list
    tokens: list[int]
    migrated: bool = False  # came from a v1 file: save it now to convert it


@dataclass
class SaveReport:
    bytes_written: int
    blocks_written: int
    blocks_shared: int


class CacheRepository:
    def __init__(self, caches_dir: Path, expect: Expectation, new_cache: Callable[[], list],
                 kv: KVSettings = KVSettings(), *, replace: Callable = atomic_replace):
        self.dir = Path(caches_dir)
        self.agents_dir = self.dir / "agents"
        self.quarantine = Quarantine(self.dir / "quarantine")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, whatever the umask
        self.agents_dir.mkdir(mode=0o700, exist_ok=True)
        self.expect, self.kv, self.new_cache = expect, kv, new_cache
        self.fingerprint = cache_fingerprint(expect.model, expect.dtype, kv)
        self.blocks = BlockStore(self.dir / "blocks", self.fingerprint, kv.block_tokens,
                                 replace=replace, quarantine_dir=self.quarantine.dir)
        self._replace = replace
        layers = new_cache()
        self.classes = [type(layer).__name__ for layer in layers]
        # Prefix sharing needs every layer to be a pure function of the prefix: a sliding
        # window's state at a block boundary is stored nowhere, so such models share nothing.
        self.shareable = all(is_row_layer(layer) for layer in layers)
        self.last_save: SaveReport | None = None
        self._layout: RowLayout | None = None
        self._manifests: dict[str, dict] = {}
        self._stats: dict = {}
        self._info: dict[str, ColdInfo] = {}
        self._scan()
        self.gc()

    @property
    def problems(self) -> list[CacheProblem]:
        return self.quarantine.problems

    @property
    def replace(self) -> Callable:
        """The durable-write seam (fault tests swap it): every block, tail, window, manifest."""
        return self._replace

    @replace.setter
    def replace(self, fn: Callable) -> None:
        self._replace = self.blocks.replace = fn

    # ---- paths --------------------------------------------------------------------

    def agent_dir(self, name: str) -> Path:
        return self.agents_dir / name

    def path(self, name: str) -> Path:
        """The agent's manifest (its blocks, tail and window are named inside)."""
        return self.agent_dir(validate_agent_name(name)) / MANIFEST

    def legacy_path(self, name: str) -> Path:
        return self.dir / (name + LEGACY_SUFFIX)

    def saved_at(self, name: str) -> float | None:
        return self.info(name).saved_at

    # ---- saving -------------------------------------------------------------------

    def save(self, name: str, cache: list, tokens: list[int], record: AgentRecord) -> bool:
        """Make `cache` (holding exactly `tokens`) the agent's durable cache. False: a cache
        class that cannot be stored, or nothing to store. OSError propagates (disk full)."""
        try:
            self.last_save = self._save(name, cache, tokens, record_to_json(record))
        except UnsupportedCache as e:
            log.warning("agent %s: cache not saved: %s", name, e)
            return False
        return self.last_save is not None

    def _save(self, name: str, cache: list, tokens: list[int], record_json: str) -> SaveReport | None:
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
        parents = [ROOT, *ids[:-1]]
        adir = self.agent_dir(name)
        if not adir.exists():
            adir.mkdir(mode=0o700)
            fsync_dir(self.agents_dir)
        cont = durable_tail(adir, prev, tokens, self.fingerprint) if layout else None
        # The turn may have completed the tail's block: then its rows are already in the
        # tail file, and the rest up to the boundary and a trailer make that file the block
        # (each row written once). A block another agent stored is not made again.
        k = cont["start"] // B if cont and cont["start"] < len(ids) * B else None
        for i, bid in enumerate(ids):
            if i != k and not self.blocks.has(bid):
                written += self.blocks.write(bid, parents[i], tokens[i * B:(i + 1) * B], layout,
                                             row_buffers(views, i * B, (i + 1) * B), i * B)
                new_blocks += 1
        if k is not None:
            if not self.blocks.has(ids[k]):
                path = adir / cont["file"]
                if cont["end"] < (k + 1) * B:
                    written += append_rows(path, cont, views, (k + 1) * B)
                wrote, linked = self.blocks.adopt(ids[k], parents[k], tokens[k * B:(k + 1) * B], layout, k * B,
                                                  path, cont["segments"])
                written += wrote
                if not linked:  # no hard links here: the block from memory after all
                    written += self.blocks.write(ids[k], parents[k], tokens[k * B:(k + 1) * B], layout,
                                                 row_buffers(views, k * B, (k + 1) * B), k * B)
                new_blocks += 1
            cont = None  # the new tail starts past the boundary, in a new generation's file
        gen = prev["gen"] + 1 if prev else 1
        tail, wrote = save_tail(self._replace, adir, cont, tokens, len(ids) * B, views, gen) if layout else (None, 0)
        written += wrote
        window = None
        if window_layers:
            wfile = f"window.{gen}.safetensors"
            written += save_layers(adir / wfile, window_layers, self._window_meta(name, gen, n), self._replace)
            window = {"file": wfile}
        m = {
            "format": FORMAT, "version": FORMAT_VERSION, "agent": name,
            "model": self.expect.model, "tokenizer": self.expect.tokenizer, "dtype": self.expect.dtype,
            "kv": self.kv.to_json(), "fingerprint": self.fingerprint, "classes": self.classes,
            "layout": layout.to_json() if layout else None, "gen": gen, "saved_at": time.time(),
            "n_tokens": n, "tokens": list(map(int, tokens)), "blocks": ids, "tail": tail, "window": window,
            "record": record_json,
        }
        written += write_file(self._replace, adir / MANIFEST, [encode_manifest(m)])
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

    @staticmethod
    def _window_meta(name: str, gen: int, n: int) -> dict[str, str]:
        return {"agentd.agent": name, "agentd.gen": str(gen), "agentd.n_tokens": str(n)}

    # ---- loading ------------------------------------------------------------------

    def load(self, name: str) -> Loaded | Refusal | None:
        """The agent's cache, verified: whole, or its longest intact prefix (the rest is
        prefilled again), or a Refusal (moved aside), or None (nothing stored)."""
        m = self._manifests.get(name)
        if m is None:
            legacy = self.legacy_path(name)
            if not legacy.exists():
                return None
            try:
                lc = load_cache(legacy, self.expect)
                return Loaded(lc.cache, lc.tokens, migrated=True)
            except CacheFileError as e:
                self.quarantine.refuse(legacy, name, e.reason, str(e))
                return Refusal(e.reason, str(e))
        try:
            self._check_compatible(m)
            cache = self.new_cache()
            good = self._fill(name, m, cache)
        except CacheFileError as e:
            self._drop_manifest(name, e)
            return Refusal(e.reason, str(e))
        if not good:
            return Refusal("blocks", f"{name}: no stored block of its cache could be used")
        return Loaded(cache, m["tokens"][:good])

    def _check_compatible(self, m: dict) -> None:
        name = m.get("agent", "?")
        for key in ("model", "tokenizer", "dtype"):
            if m.get(key) != getattr(self.expect, key):
                raise CacheFileError(key, f"{name}: cache made with another {key} ({m.get(key)})")
        if m.get("kv") != self.kv.to_json() or m.get("fingerprint") != self.fingerprint:
            raise CacheFileError("kv-bits", f"{name}: cache stored with other KV settings ({m.get('kv')})")
        if m.get("classes") != self.classes:
            raise CacheFileError("layout", f"{name}: cache layers do not match the model's")
        if len(m["tokens"]) != m["n_tokens"] or self.blocks.chain(m["tokens"]) != m["blocks"]:
            raise CacheFileError("corrupt", f"{name}: the manifest's blocks do not match its tokens")

    def _fill(self, name: str, m: dict, cache: list) -> int:
        """Read blocks, tail and window into `cache`; returns how many tokens it holds."""
        n = m["n_tokens"]
        good = 0
        if m["layout"] is not None:
            layout = RowLayout.from_json(m["layout"])
            self._layout = self._layout or layout
            tail = (self.agent_dir(name) / m["tail"]["file"], m["tail"]) if m["tail"] else None
            good = self._read_rows(name, m["blocks"], m["tokens"], layout, cache, n, tail)
        if m["window"] is not None:
            if good < n and m["layout"] is not None:
                return 0  # a window holds the state after all n tokens: useless for a prefix
            path = self.agent_dir(name) / m["window"]["file"]
            try:
                layers = load_layers(path, self._window_meta(name, m["gen"], n))
            except CacheFileError as e:
                self.quarantine.refuse(path, name, e.reason, str(e))
                return 0
            for i, layer in layers.items():
                cache[i] = layer
            good = n
        return good

    def _read_rows(self, name: str, ids: list[str], tokens: list[int], layout: RowLayout, cache: list,
                   n: int, tail: tuple[Path, dict] | None = None) -> int:
        """Blocks (then the tail's segments) in order into `cache`'s full-attention layers;
        returns how many tokens they hold. The first refused block is quarantined, a
        refused tail moved aside, and either ends the prefix kept: nothing unchecked is used."""
        t0 = time.perf_counter()
        B = self.kv.block_tokens
        parents = [ROOT, *ids[:-1]]
        fds: list[int] = []
        pieces: list[tuple[str, Segment]] = []  # (the block id, or "" for the tail; its rows)
        refused: tuple[int, str, str, str] | None = None  # (token, block id or "", reason, message)
        try:
            for i, bid in enumerate(ids):
                try:
                    fd, segs = self.blocks.open_rows(bid, parents[i], tokens[i * B:(i + 1) * B], layout, i * B)
                except BlockError as e:
                    refused = (i * B, bid, e.reason, str(e))
                    break
                fds.append(fd)
                pieces += [(bid, seg) for seg in segs]
            if refused is None and tail is not None:
                opened = open_tail(tail[0], tail[1])
                if opened is None:
                    refused = (len(ids) * B, "", "missing", "")
                else:
                    fds.append(opened[0])
                    pieces += [("", seg) for seg in opened[1]]
            how = read_pieces(layout, n, [seg for _, seg in pieces])
        finally:
            for fd in fds:
                os.close(fd)
        for owner, seg in pieces:
            if seg.error is not None:
                refused = (seg.at, owner, seg.error, str(block_error(owner, seg.error)) if owner else "")
                break
        good = refused[0] if refused else (pieces[-1][1].at + pieces[-1][1].count if pieces else 0)
        install(cache, layout, how.pop("arrays"), good)
        if refused is not None:
            at, bid, reason, message = refused
            if bid:
                moved = self.blocks.quarantine(bid, reason) if reason != "missing" else ""
                self.quarantine.report(name, reason, f"{message}; tokens from {at} on are prefilled again", moved)
                self._refresh()
            else:
                # Moved aside, so that the next save starts a new tail instead of
                # appending to (or making a block of) a damaged file.
                moved = self.quarantine.move_aside(tail[0], name, reason) if reason != "missing" else ""
                self.quarantine.report(name, reason,
                                       f"{name}: tail refused ({reason}) at token {at}; prefilling from there", moved)
        log.info("restored %s: %d tokens, %.0f MB in %.0f ms (%s)", name, good, layout.row_bytes() * good / 1e6,
                 (time.perf_counter() - t0) * 1000, how["how"])
        return good

    # ---- sharing ------------------------------------------------------------------

    def stored_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the store holds as consecutive blocks."""
        if not self.shareable:
            return 0
        k = 0
        for bid in self.blocks.chain(tokens):
            if not self.blocks.has(bid):
                break
            k += 1
        return k * self.kv.block_tokens

    def load_prefix(self, tokens: list[int], at_least: int) -> Loaded | None:
        """A fresh cache holding the longest stored block prefix of `tokens`, if that is
        longer than `at_least` tokens (what the caller's cache already holds)."""
        n = self.stored_prefix(tokens)
        if n <= at_least or (self._layout is None and not self._learn_layout()):
            return None
        cache = self.new_cache()
        good = self._read_rows("(shared prefix)", self.blocks.chain(tokens[:n]), tokens, self._layout, cache, n)
        if good <= at_least:
            return None
        return Loaded(cache, list(tokens[:good]))

    def _learn_layout(self) -> bool:
        for m in self._manifests.values():
            if m.get("layout") and m.get("fingerprint") == self.fingerprint:
                self._layout = RowLayout.from_json(m["layout"])
                return True
        return False

    def fork(self, source: str, name: str, record: AgentRecord) -> bool:
        """Give `name` a copy of `source`'s durable cache: the same blocks, a copied tail."""
        m = self._manifests.get(source)
        if m is None or name in self._manifests or m["window"]:
            return False  # a window file belongs to one agent: a fork of such a model prefills
        src, adir = self.agent_dir(source), self.agent_dir(name)
        adir.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(self.agents_dir)
        if m["tail"]:
            self._replace(adir / m["tail"]["file"], lambda tmp: shutil.copyfile(src / m["tail"]["file"], tmp))
        new = {**m, "agent": name, "record": record_to_json(record), "saved_at": time.time()}
        write_file(self._replace, adir / MANIFEST, [encode_manifest(new)])
        self._manifests[name] = new
        self._refresh()
        return True

    # ---- removal and garbage ------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Forget the agent's cache: the manifest first (it holds the record copy), then the
        rest. Returns whether there was one; an OSError (a read-only home) propagates with
        the manifest, and so the stored cache, unchanged."""
        existed = False
        try:
            (self.agent_dir(name) / MANIFEST).unlink()
            existed = True
            fsync_dir(self.agent_dir(name))
        except FileNotFoundError:
            pass
        self._manifests.pop(name, None)
        self._drop_dir(name)
        try:
            self.legacy_path(name).unlink()
            existed = True
            fsync_dir(self.dir)
        except FileNotFoundError:
            pass
        self.gc()
        return existed

    def gc(self) -> dict:
        """Remove every block no durable manifest names. Returns what was reclaimed."""
        self.blocks.rescan()
        live = {b for m in self._manifests.values() for b in m["blocks"]}
        garbage = [b for b in self.blocks.sizes() if b not in live]
        freed = self.blocks.remove(garbage)
        if garbage:
            log.info("gc: removed %d unused block(s), %d bytes", len(garbage), freed)
        self._refresh()
        return {"removed_blocks": len(garbage), "freed_bytes": freed}

    def _drop_dir(self, name: str) -> None:
        shutil.rmtree(self.agent_dir(name), ignore_errors=True)
        fsync_dir(self.agents_dir)

    def _drop_manifest(self, name: str, err: CacheFileError) -> None:
        self.quarantine.refuse(self.agent_dir(name) / MANIFEST, name, err.reason, str(err))
        self._manifests.pop(name, None)
        self._drop_dir(name)
        self.gc()

    # ---- start-up, recovery, accounting -------------------------------------------

    def _scan(self) -> None:
        """Load every manifest; remove temp files and agent folders no manifest completes."""
        for p in self.dir.iterdir():
            if p.is_file() and is_temp(p):
                with contextlib.suppress(OSError):
                    p.unlink()
                log.info("removed an interrupted write: %s", p.name)
        for adir in sorted(self.agents_dir.iterdir()):
            name = adir.name
            try:
                validate_agent_name(name)
            except ProtocolError:
                continue
            if not adir.is_dir():
                continue
            path = adir / MANIFEST
            if not path.exists():
                self._drop_dir(name)  # a first save or a delete that a crash cut short
                continue
            try:
                self._manifests[name] = parse_manifest(path.read_bytes(), name)
            except (OSError, ManifestError) as e:
                reason = getattr(e, "reason", "unreadable")
                self.quarantine.refuse(path, name, reason, str(e))
                self._drop_dir(name)
                continue
            for p in adir.iterdir():
                if is_temp(p):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def recover_records(self, records: Records) -> None:
        """Stored caches without a record (agents.db was lost or replaced): every manifest
        (and v1 file) carries a copy of its agent's record as of its last save, so the agent
        comes back with the conversation up to that save instead of being silently dropped."""
        stored = [(n, m.get("record"), None) for n, m in sorted(self._manifests.items())]
        stored += [(p.name[: -len(LEGACY_SUFFIX)], None, p) for p in sorted(self.dir.glob("*" + LEGACY_SUFFIX))
                   if p.is_file() and not is_temp(p) and p.name[: -len(LEGACY_SUFFIX)] not in self._manifests]
        for name, record, legacy in stored:
            try:
                validate_agent_name(name)
            except ProtocolError:
                log.warning("ignoring stored cache %r: not the name of an agent", name)
                continue
            if records.exists(name):
                continue
            try:
                rec = record_from_json(read_verified_header(legacy).get("agentd.record") if legacy else record, name)
            except CacheFileError as e:
                self._refuse(name, legacy, e)
                continue
            except (ValueError, KeyError, TypeError) as e:
                self._refuse(name, legacy, CacheFileError("record", f"{name}: no usable record copy ({e})"))
                continue
            records.restore(rec)
            log.warning("agent %s: its record was missing; recovered %d message(s) from its stored cache",
                        name, len(rec.messages))

    def _refuse(self, name: str, legacy: Path | None, err: CacheFileError) -> None:
        if legacy is None:
            self._drop_manifest(name, err)
        else:
            self.quarantine.refuse(legacy, name, err.reason, str(err))

    def _refresh(self) -> None:
        """Recompute the snapshots `info` and `stats` hand to other threads (replaced whole)."""
        info, stats = summarize(self._manifests, self.blocks.sizes(), self.agent_dir)
        self._info = {n: ColdInfo(*v) for n, v in info.items()}
        self._stats = {**stats, "legacy_files": sum(1 for _ in self.dir.glob("*" + LEGACY_SUFFIX)),
                       "block_tokens": self.kv.block_tokens, "kv_bits": self.kv.bits}

    def stats(self) -> dict:
        return dict(self._stats)

    def restore_rows(self, name: str) -> tuple[RowLayout, int] | None:
        """The row layout and token count a restore of `name` fills (from its manifest),
        or None when it stores no full-attention rows under this store's settings."""
        m = self._manifests.get(name)
        if m is None or m.get("layout") is None or m.get("fingerprint") != self.fingerprint:
            return None
        try:
            return RowLayout.from_json(m["layout"]), int(m["n_tokens"])
        except (RowsError, KeyError, TypeError, ValueError):
            return None  # its restore reports the damage; a guess about memory need not

    def info(self, name: str) -> ColdInfo:
        """What is stored without loading it; zeros when there is nothing."""
        if name in self._info:
            return self._info[name]
        legacy = self.legacy_path(name)
        with contextlib.suppress(OSError):
            return ColdInfo(0, legacy.stat().st_size, legacy.stat().st_mtime)
        return ColdInfo()
