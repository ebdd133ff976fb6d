"""Content-addressed KV blocks: fixed runs of tokens' full-attention rows, one file each.

A block holds the keys and values of `block_tokens` consecutive tokens for every
full-attention layer. Its id is a hash chain,
`sha256(cache fingerprint ‖ parent id ‖ token ids)`, so two agents whose token streams
agree up to a block boundary name the same blocks and store them once; the fingerprint
(model, dtype, kv-bits, group size, block size) keeps blocks of another setting from ever
matching. Only the naming needs a cryptographic hash, and it runs over token ids (a few
hundred bytes a block). The rows themselves are checked with xxh3-128, which runs faster
than memory copy.

File `caches/blocks/<id>.kvb`: `MAGIC`, a little-endian u32 header length, the header
(JSON: id, parent, tokens, layout, checksum), zero padding to a 4 KiB boundary, then the
rows in `kvrows` storage order. Written to a temp name, fsynced, renamed, the directory
fsynced (`atomic.atomic_replace`): a crash leaves a whole block or none. A block is
immutable once named; which blocks are alive is decided by the manifests (`kvstore`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_replace, fsync_dir, is_temp
from .kvrows import RowLayout, RowsError, digest, read_buffers, write_buffers

log = logging.getLogger("agentd.blocks")

MAGIC = b"AGKVBLK\x01"
SUFFIX = ".kvb"
ALIGN = 4096
MAX_HEADER = 1 << 20
ROOT = "0" * 64


class BlockError(Exception):
    """A block that must not be used. `reason`: missing, truncated, corrupt, checksum, layout."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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

    def write(self, bid: str, parent: str, tokens: list[int], layout: RowLayout, rows: list[memoryview]) -> int:
        """Store a block (unless it is already there). Returns the bytes written."""
        if bid in self._sizes:
            return 0
        if len(tokens) != self.block_tokens or block_id(self.fingerprint, parent, tokens) != bid:
            raise ValueError("block id does not match its parent and tokens")
        header = json.dumps({"id": bid, "parent": parent, "tokens": list(map(int, tokens)),
                             "layout": layout.to_json(), "checksum": digest(rows)},
                            separators=(",", ":")).encode()
        head = MAGIC + struct.pack("<I", len(header)) + header
        head += b"\0" * (-len(head) % ALIGN)
        written = [0]

        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)  # atomic_replace created it
            try:
                written[0] = write_buffers(fd, [head, *rows])
            finally:
                os.close(fd)

        path = self.path(bid)
        self.replace(path, write)
        self._sizes[bid] = written[0]
        return written[0]

    # ---- reading ------------------------------------------------------------------

    def read_into(self, bid: str, parent: str, tokens: list[int], layout: RowLayout,
                  targets: list[memoryview]) -> None:
        """Fill `targets` with the block's rows, verified; raises BlockError if it is not
        exactly the block that `parent` and `tokens` name, whole and intact."""
        if block_id(self.fingerprint, parent, tokens) != bid:
            raise BlockError("corrupt", f"block {bid[:12]}: the manifest's tokens do not name it")
        try:
            fd = os.open(self.path(bid), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise BlockError("missing", f"block {bid[:12]} is missing") from None
        except OSError as e:
            raise BlockError("unreadable", f"block {bid[:12]}: {e.strerror or e}") from e
        try:
            head = os.pread(fd, ALIGN, 0)
            if len(head) < 12 or head[:8] != MAGIC:
                raise BlockError("truncated" if len(head) < 12 else "corrupt", f"block {bid[:12]}: bad header")
            (n,) = struct.unpack("<I", head[8:12])
            if n > MAX_HEADER:
                raise BlockError("corrupt", f"block {bid[:12]}: implausible header length")
            if 12 + n > len(head):
                head += os.pread(fd, 12 + n - len(head), len(head))
            try:
                meta = json.loads(head[12 : 12 + n])
                ok = (meta["id"] == bid and meta["parent"] == parent and meta["tokens"] == list(tokens))
            except (ValueError, KeyError, TypeError):
                raise BlockError("corrupt", f"block {bid[:12]}: header unreadable") from None
            if not ok:
                raise BlockError("corrupt", f"block {bid[:12]}: header names another block")
            if RowLayout.from_json(meta["layout"]) != layout:
                raise BlockError("layout", f"block {bid[:12]}: rows laid out for another cache")
            read_buffers(fd, targets, -(-(12 + n) // ALIGN) * ALIGN)
            if digest(targets) != meta["checksum"]:
                raise BlockError("checksum", f"block {bid[:12]}: checksum mismatch (the file is corrupt)")
        except RowsError as e:
            raise BlockError("truncated" if str(e) == "truncated" else "corrupt", f"block {bid[:12]}: {e}") from e
        except OSError as e:
            raise BlockError("unreadable", f"block {bid[:12]}: {e.strerror or e}") from e
        finally:
            os.close(fd)

    def verify(self, bid: str) -> None:
        """Check a stored block on its own (header, id, size, checksum); BlockError if not whole."""
        try:
            with open(self.path(bid), "rb") as f:
                head = f.read(ALIGN)
                (n,) = struct.unpack("<I", head[8:12]) if len(head) >= 12 else (0,)
                if head[:8] != MAGIC or n > MAX_HEADER:
                    raise BlockError("corrupt", f"block {bid[:12]}: bad header")
                f.seek(12)
                meta = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise BlockError("corrupt", f"block {bid[:12]}: unreadable ({e})") from e
        layout = RowLayout.from_json(meta["layout"])
        buf = bytearray(layout.row_bytes() * self.block_tokens)
        views = np.frombuffer(buf, dtype=np.uint8)
        if self.path(bid).stat().st_size != -(-(12 + n) // ALIGN) * ALIGN + len(buf):
            raise BlockError("truncated", f"block {bid[:12]}: wrong size")
        self.read_into(bid, meta["parent"], meta["tokens"], layout, [memoryview(views)])

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
