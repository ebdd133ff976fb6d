"""Content-addressed KV blocks: fixed runs of tokens' full-attention rows, one file each.

A block holds the keys and values of `block_tokens` consecutive tokens for every
full-attention layer. Its id is a hash chain,
`sha256(cache fingerprint ‖ parent id ‖ token ids)`, so two agents whose token streams
agree up to a block boundary name the same blocks and store them once; the fingerprint
(model, dtype, kv-bits, group size, block size) keeps blocks of another setting from ever
matching. Only the naming needs a cryptographic hash, and it runs over token ids (a few
hundred bytes a block). The rows themselves are checked with xxh3-128, which runs faster
than memory copy.

File `caches/blocks/<id>.kvb` (format 2): the rows first, as one or more segments in
`kvrows` storage order (each segment a run of tokens `[at, at + count)`: array by array,
head by head), then the trailer: a JSON header (id, parent, tokens, layout, the block's
first token `start`, segments `[at, count, offset, bytes, xxh3]`), its u32 length and
`MAGIC2`. That is the form of an agent's tail file (kvstore.py), so the tail that reaches
a block boundary becomes the block by appending the last rows and the trailer and
hard-linking it here (`adopt`): each row is written once. A block made from memory (a
turn that crossed more than one boundary, a tail that cannot be linked) is one segment
and the trailer, written to a temp name, fsynced, renamed, the directory fsynced
(`atomic.atomic_replace`). Either way a crash leaves a whole block or none under its name.
Format 1 (`MAGIC` first, a u32 header length, the JSON header with one checksum over all
rows, zeros to 4 KiB, then the rows) is still read: stores on disk hold it. A block is
immutable once named; which blocks are alive is decided by the manifests (`kvstore`).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_replace, fsync_dir, full_fsync, is_temp
from .kvrows import RowLayout, RowsError, Segment, _host_dtype, nbytes, read_segment, row_buffers, segment_digest
from .kvrows import write_buffers

log = logging.getLogger("agentd.blocks")

MAGIC = b"AGKVBLK\x01"  # format 1: header first (read, no longer written)
MAGIC2 = b"AGKVBLK\x02"  # format 2: the last 8 bytes, after the trailer and its length
TRAILER_READ = 16384  # one pread from the end gets a 256-token trailer whole
SUFFIX = ".kvb"
ALIGN = 4096
MAX_HEADER = 1 << 20
ROOT = "0" * 64


class BlockError(Exception):
    """A block that must not be used. `reason`: missing, truncated, corrupt, checksum, layout."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def block_error(bid: str, reason: str) -> BlockError:
    """The BlockError for rows that failed their read (`kvrows.Segment.error`)."""
    why = {"checksum": "checksum mismatch (the file is corrupt)", "truncated": "truncated",
           "unreadable": "unreadable"}.get(reason, reason)
    return BlockError(reason, f"block {bid[:12]}: {why}")


def chain_ids(fingerprint: str, tokens: list[int], block_tokens: int) -> list[str]:
    """Ids of the full blocks of `tokens`, in order; a partial last block has none."""
    ids, parent = [], ROOT
    for lo in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = block_id(fingerprint, parent, tokens[lo : lo + block_tokens])
        ids.append(parent)
    return ids


def block_id(fingerprint: str, parent: str, tokens: list[int]) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode() + b"\0" + parent.encode() + b"\0")
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return h.hexdigest()


class BlockStore:
    """The files under `caches/blocks/`. Single-threaded (the MLX worker), except `sizes()`."""

    def __init__(self, root: Path, fingerprint: str, block_tokens: int = 256, *,
                 replace: Callable = atomic_replace, quarantine_dir: Path | None = None, clean: bool = True):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.replace = replace
        self.quarantine_dir = quarantine_dir or self.root.parent / "quarantine"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self.rescan(clean)

    # ---- naming -------------------------------------------------------------------

    def chain(self, tokens: list[int]) -> list[str]:
        return chain_ids(self.fingerprint, tokens, self.block_tokens)

    def path(self, bid: str) -> Path:
        return self.root / (bid + SUFFIX)

    def has(self, bid: str) -> bool:
        return bid in self._sizes

    def sizes(self) -> dict[str, int]:
        """Every block file on disk and its size (a copy: safe to read from any thread)."""
        return dict(self._sizes)

    def rescan(self, clean: bool = True) -> None:
        """Index the files on disk; temp files of interrupted writes are removed (if `clean`)."""
        sizes = {}
        for p in self.root.iterdir():
            if is_temp(p) and clean:
                with contextlib.suppress(OSError):
                    p.unlink()
                log.info("removed an interrupted block write: %s", p.name)
            elif p.name.endswith(SUFFIX) and p.is_file() and len(p.name) == 64 + len(SUFFIX):
                sizes[p.name[:64]] = p.stat().st_size
        self._sizes = sizes

    # ---- writing ------------------------------------------------------------------

    def _check(self, bid: str, parent: str, tokens: list[int]) -> None:
        if len(tokens) != self.block_tokens or block_id(self.fingerprint, parent, tokens) != bid:
            raise ValueError("block id does not match its parent and tokens")

    def _trailer(self, bid: str, parent: str, tokens: list[int], layout: RowLayout, start: int,
                 segments: list) -> bytes:
        meta = json.dumps({"id": bid, "parent": parent, "tokens": list(map(int, tokens)), "layout": layout.to_json(),
                           "start": start, "segments": segments}, separators=(",", ":")).encode()
        return meta + struct.pack("<I", len(meta)) + MAGIC2

    def write(self, bid: str, parent: str, tokens: list[int], layout: RowLayout, rows: list[memoryview],
              start: int) -> int:
        """Store a block from memory (unless it is already there): rows `[start, start +
        block_tokens)` as one segment, then the trailer. Returns the bytes written."""
        if bid in self._sizes:
            return 0
        self._check(bid, parent, tokens)
        size = nbytes(rows)
        trailer = self._trailer(bid, parent, tokens, layout, start,
                                [[start, self.block_tokens, 0, size, segment_digest(rows, start, self.block_tokens)]])
        written = [0]

        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)  # atomic_replace created it
            try:
                written[0] = write_buffers(fd, [*rows, trailer])
            finally:
                os.close(fd)

        self.replace(self.path(bid), write)
        self._sizes[bid] = written[0]
        return written[0]

    def adopt(self, bid: str, parent: str, tokens: list[int], layout: RowLayout, start: int, tail: Path,
              segments: list) -> tuple[int, bool]:
        """Make an agent's tail file the block: its `segments` hold exactly rows `[start,
        start + block_tokens)`, durable. Appends the trailer past the last segment, fsyncs,
        hard-links the file under the block's name and fsyncs this directory. Returns the
        bytes written and whether the block now exists; False (a filesystem without hard
        links, say): the caller writes it from memory. The trailer lies past every byte a
        manifest names, and a tail file that is also a block is never appended to again."""
        self._check(bid, parent, tokens)
        expect_at, expect_off = start, 0
        for at, count, offset, size, _ in segments:
            if at != expect_at or offset != expect_off or size != count * layout.row_bytes():
                raise ValueError("the tail's segments are not this block's rows, in order")
            expect_at, expect_off = at + count, offset + size
        if expect_at != start + self.block_tokens:
            raise ValueError("the tail's segments do not end at the block boundary")
        trailer = self._trailer(bid, parent, tokens, layout, start, segments)
        fd = os.open(tail, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            wrote = write_buffers(fd, [trailer], expect_off)
            os.ftruncate(fd, expect_off + wrote)  # a trailer an interrupted save left further on
            full_fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tail, self.path(bid))
        except OSError as e:
            log.info("block %s: cannot link the tail as the block (%s); writing it from memory", bid[:12], e)
            return wrote, False
        fsync_dir(self.root)
        self._sizes[bid] = expect_off + wrote
        return wrote, True

    # ---- reading ------------------------------------------------------------------

    def _segments(self, fd: int, bid: str) -> tuple[dict, list, int]:
        """The block file's header and its row segments `(row in block, count, offset,
        bytes or None: as the layout says, checksum, checksum prefix)` and where its rows
        must end (either format)."""
        size = os.fstat(fd).st_size
        end = os.pread(fd, min(size, TRAILER_READ), max(0, size - TRAILER_READ))
        if len(end) >= 12 and end[-8:] == MAGIC2:
            (n,) = struct.unpack("<I", end[-12:-8])
            if n + 12 > size or n > MAX_HEADER:
                raise BlockError("corrupt", f"block {bid[:12]}: implausible trailer length")
            if n + 12 > len(end):
                end = os.pread(fd, n + 12 - len(end), size - n - 12) + end
            meta = self._json(end[-12 - n:-12], bid)
            try:
                start, segs = int(meta["start"]), meta["segments"]
                out = [(int(at) - start, int(count), int(offset), int(nb), str(checksum), f"{at}:{count}".encode())
                       for at, count, offset, nb, checksum in segs]
            except (KeyError, TypeError, ValueError):
                raise BlockError("corrupt", f"block {bid[:12]}: trailer unreadable") from None
            data_end = size - n - 12
        else:
            head = os.pread(fd, ALIGN, 0)
            if len(head) < 12 or head[:8] != MAGIC:
                # Format 2 is written whole before its name exists: a file without its
                # trailer was cut short or damaged after the fact.
                raise BlockError("truncated", f"block {bid[:12]}: no trailer (truncated or damaged)")
            (n,) = struct.unpack("<I", head[8:12])
            if n > MAX_HEADER:
                raise BlockError("corrupt", f"block {bid[:12]}: implausible header length")
            if 12 + n > len(head):
                head += os.pread(fd, 12 + n - len(head), len(head))
            meta = self._json(head[12:12 + n], bid)
            data = -(-(12 + n) // ALIGN) * ALIGN
            out = [(0, self.block_tokens, data, None, meta.get("checksum"), b"")]
            data_end = size
        return meta, out, data_end

    @staticmethod
    def _json(raw: bytes, bid: str) -> dict:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise BlockError("corrupt", f"block {bid[:12]}: header unreadable") from None
        if not isinstance(meta, dict):
            raise BlockError("corrupt", f"block {bid[:12]}: header unreadable")
        return meta

    def open_rows(self, bid: str, parent: str, tokens: list[int], layout: RowLayout, start: int = 0
                  ) -> tuple[int, list[Segment]]:
        """Open the block and check all but its rows: that it is exactly the block `parent`
        and `tokens` name, laid out as `layout`, its segments covering its rows in order and
        the file whole. Returns the open fd (the caller closes it) and its segments, rows
        counted from `start` (the block's first token). BlockError if it must not be used."""
        if block_id(self.fingerprint, parent, tokens) != bid:
            raise BlockError("corrupt", f"block {bid[:12]}: the manifest's tokens do not name it")
        try:
            fd = os.open(self.path(bid), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise BlockError("missing", f"block {bid[:12]} is missing") from None
        except OSError as e:
            raise BlockError("unreadable", f"block {bid[:12]}: {e.strerror or e}") from e
        try:
            meta, segments, data_end = self._segments(fd, bid)
            try:
                ok = meta["id"] == bid and meta["parent"] == parent and meta["tokens"] == list(tokens)
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise BlockError("corrupt", f"block {bid[:12]}: header names another block")
            if meta.get("layout") != layout.to_json() and RowLayout.from_json(meta.get("layout")) != layout:
                raise BlockError("layout", f"block {bid[:12]}: rows laid out for another cache")
            row, pos, row_bytes = 0, segments[0][2] if segments else 0, layout.row_bytes()
            for at, count, offset, nb, _, _ in segments:
                nb = count * row_bytes if nb is None else nb
                if at != row or count <= 0 or offset != pos or nb != count * row_bytes:
                    raise BlockError("corrupt", f"block {bid[:12]}: segments do not cover its rows in order")
                row, pos = at + count, offset + nb
            if row != self.block_tokens or pos > data_end:
                raise BlockError("truncated", f"block {bid[:12]}: shorter than its rows")
            if pos != data_end:
                raise BlockError("corrupt", f"block {bid[:12]}: wrong size")
        except RowsError as e:
            os.close(fd)
            raise BlockError("corrupt", f"block {bid[:12]}: {e}") from e
        except OSError as e:
            os.close(fd)
            raise BlockError("unreadable", f"block {bid[:12]}: {e.strerror or e}") from e
        except BaseException:
            os.close(fd)
            raise
        return fd, [Segment(fd, start + at, count, offset, checksum, prefix)
                    for at, count, offset, _, checksum, prefix in segments]

    def read_into(self, bid: str, parent: str, tokens: list[int], layout: RowLayout,
                  targets: list[memoryview]) -> None:
        """Fill `targets` (the block's rows in storage order, split anywhere: one buffer per
        array and head, or one for all) with the block's rows, verified; raises BlockError
        if it is not exactly the block that `parent` and `tokens` name, whole and intact."""
        rows = _row_runs(targets, layout, self.block_tokens)
        fd, segments = self.open_rows(bid, parent, tokens, layout)
        try:
            for seg in segments:
                try:
                    read_segment(seg, rows(seg.at, seg.at + seg.count))
                except RowsError as e:
                    raise block_error(bid, str(e)) from e
        finally:
            os.close(fd)

    def verify(self, bid: str) -> None:
        """Check a stored block on its own (header, id, size, checksums); BlockError if not whole."""
        try:
            fd = os.open(self.path(bid), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                meta, _, _ = self._segments(fd, bid)
            finally:
                os.close(fd)
            layout = RowLayout.from_json(meta["layout"])
            parent, tokens = meta["parent"], meta["tokens"]
        except (OSError, KeyError, TypeError, RowsError) as e:
            raise BlockError("corrupt", f"block {bid[:12]}: unreadable ({e})") from e
        views = [np.zeros((1, s.heads, self.block_tokens, s.width), dtype=_host_dtype(s.dtype)) for s in layout.arrays]
        self.read_into(bid, parent, tokens, layout, row_buffers(views, 0, self.block_tokens))

    # ---- removal ------------------------------------------------------------------

    def quarantine(self, bid: str, reason: str) -> str:
        """Move a refused block aside (kept for inspection); it is no longer `has`."""
        self._sizes.pop(bid, None)
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"block-{bid}.{int(time.time() * 1000)}.{reason}{SUFFIX}"
        try:
            os.replace(self.path(bid), dest)
        except FileNotFoundError:
            return ""
        except OSError as e:
            log.error("block %s: cannot move it aside: %s", bid[:12], e)
            return str(self.path(bid))
        return str(dest)

    def remove(self, ids: list[str]) -> int:
        """Delete blocks (garbage: no durable manifest names them). Returns bytes freed."""
        freed = 0
        for bid in ids:
            size = self._sizes.pop(bid, 0)
            with contextlib.suppress(FileNotFoundError):
                self.path(bid).unlink()
                freed += size
        if ids:
            fsync_dir(self.root)
        return freed


def _row_runs(targets: list[memoryview], layout: RowLayout, block_tokens: int) -> Callable[[int, int], list]:
    """`rows(a, b)`: the pieces of `targets` that hold the block's rows [a, b) in a
    segment's storage order (array by array, head by head, b - a rows each)."""
    flat = [memoryview(t).cast("B") for t in targets]
    starts = list(itertools.accumulate((len(t) for t in flat), initial=0))
    if starts[-1] != layout.row_bytes() * block_tokens:
        raise ValueError("the target buffers do not hold one block")

    def piece(off: int, n: int) -> list[memoryview]:
        out, i = [], bisect.bisect_right(starts, off) - 1
        while n:
            lo = off - starts[i]
            take = min(n, len(flat[i]) - lo)
            out.append(flat[i][lo:lo + take])
            off, n, i = off + take, n - take, i + 1
        return out

    def rows(a: int, b: int) -> list[memoryview]:
        out, base = [], 0
        for spec in layout.arrays:
            rb = spec.width * _itemsize(spec.dtype)
            for _ in range(spec.heads):
                out += piece(base + a * rb, (b - a) * rb)
                base += block_tokens * rb
        return out

    return rows


def _itemsize(dtype: str) -> int:
    return np.dtype(_host_dtype(dtype)).itemsize
