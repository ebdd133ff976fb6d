"""A restore's reads: checked segments of blocks and tails into a new cache's arrays, on
read threads made once per process.

`read_pieces` is what `CacheRepository` calls once it has opened and checked every block
and the tail (their `Segment`s); each segment's `error` says afterwards whether its rows
may be used. Where MLX's arrays are host memory (CPU, Apple) `restore_arrays.read_rows` reads
straight into them (in C where `readhash` is built); on CUDA `restore_arrays.RowTarget` stages
the rows through pinned memory while the MLX thread makes the arrays.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from .kvrows import RowLayout, RowsError, Segment, read_segment
from .restore_arrays import RowTarget, host_read_usable, native_reader, read_rows, rows_to_allocate
from .switches import switched_off

log = logging.getLogger("agentd.cacherepo")


def _read_threads() -> int:
    """Segments read at once: 16 where there are 8 cores or more (an H200's 16-core host
    read and checked 1.07 GB at 9.2 GB/s on 16 threads, 7.1 on 8: `gpu.py restore`), else
    one a core: more threads than cores only queue for the GIL between reads (on 2 cores a
    restore of 89 MiB took 18-22 ms on 2 threads and 26-33 ms on 3 to 8, one process,
    interleaved; BENCHMARKS.md section 10)."""
    cores = os.cpu_count() or 1
    default = 16 if cores >= 8 else max(2, cores)
    try:
        return max(1, min(64, int(os.environ.get("AGENTD_READ_THREADS", default))))
    except ValueError:
        return default


READ_THREADS = _read_threads()  # segments read at once in a restore (see read_pieces); env AGENTD_READ_THREADS


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The restore's read threads, made once: starting 8 threads per restore cost
    milliseconds (each start waits for the new thread to take the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="agentd-read")
    return _POOL


def read_pieces(layout: RowLayout, n: int, segments: list[Segment]) -> dict:
    """Read and check the segments' rows into new arrays (their `error`s say which may
    be used), on READ_THREADS threads. Where MLX's arrays are host memory, straight into
    them (`read_rows`); elsewhere into RowTarget's arrays (zeroed, or staged for CUDA)."""
    threads = min(READ_THREADS, max(1, len(segments)))
    if host_read_usable():
        try:
            arrays = read_rows(layout, n, segments, _pool().submit)
            how = "unwritten arrays read and checked in C" if native_reader() else "arrays made while reading"
            return {"arrays": arrays, "how": f"{how}, {threads} threads"}
        except RowsError as e:
            log.info("%s; reading into RowTarget's arrays instead", e)
            for seg in segments:
                seg.error = None
    target = RowTarget(layout, n)

    def read(seg: Segment) -> None:
        try:
            target.fill(seg.at, seg.at + seg.count, lambda rows: read_segment(seg, rows))
        except RowsError as e:
            seg.error = str(e)

    # Segments fill disjoint rows, and preadv and xxh3 release the GIL: on an H200's host
    # (gpu.py split, 1.07 GB hot in the page cache) 8 threads read at 13 GB/s and hash
    # at 37 GB/s, one thread at 2.6 and 5 GB/s. A segment after a refused one is read
    # for nothing: its rows lie beyond the prefix kept. The arrays are made here, on the
    # MLX thread, while the first segments are read (on CUDA they fill pinned slots
    # meanwhile: RowTarget.allocate).
    pending = _pool().map(read, segments)
    try:
        target.allocate()
    finally:
        list(pending)  # every read is done before the caller closes the files
    t = target.timings
    return {"arrays": target.take(),
            "how": f"arrays {t['arrays_ms']:.0f} ms; reading and checking {t['read_ms']:.0f} ms, copies to the "
                   f"GPU {t['copy_ms']:.0f} ms, summed over {t['fills']} fills on {threads} threads"}


RESERVE_ENV = "AGENTD_RESTORE_RESERVE"  # "0" (or off) skips `reserve_restores`


@dataclass(frozen=True)
class RestoreReserve:
    """Memory made ready at start for the restores of the agents used last."""

    agents: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {"agents": self.agents, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def reserve_restores(plans: Iterable[tuple[RowLayout, int]], budget: int) -> RestoreReserve | None:
    """Make and let go of the arrays the restores of `plans` (row layout, tokens; most
    likely first) would make, while their bytes fit in `budget`: MLX keeps freed buffers
    in its cache and hands them out again for the same size, so each of those restores
    then gets memory already touched. New memory costs its first touch, page faults:
    - CUDA: an H200 made the 4.3 GB of arrays of a 32k-token llama-8B restore in 255 ms of
      a 484 ms restore, and in 7 ms from the cache (gpu.py, BENCHMARKS section 12).
    - CPU: the first restore in a new process of an 8,173-token agent of the default model
      took 247 ms, 75 ms from reserved memory; 40-43 against 28-36 ms at 2,029 tokens
      (BENCHMARKS section 10). MLX's CPU cache keeps only 32 MiB by default, so its limit
      is raised by the reserve's bytes until the first time memory is given back
      (`give_back_unused`, on an eviction or when memory is short).
    Not on Apple's GPU, where it is not measured. Runs on the MLX thread, before the socket
    is bound (cli)."""
    from .backend import CPU, CUDA, backend

    kind = backend()
    if kind not in (CUDA, CPU) or switched_off(os.environ.get(RESERVE_ENV)):
        return None
    t0 = time.perf_counter()
    chosen, total = [], 0
    for layout, n in plans:
        size = layout.row_bytes() * rows_to_allocate(n)
        if total + size > budget:
            break
        chosen.append((layout, n, size))
        total += size
    if kind == CPU and chosen:
        _raise_cache_limit(total)
    agents = made = 0
    for layout, n, size in chosen:
        try:
            target = RowTarget(layout, n)  # the very arrays (shapes, dtypes) a restore makes
            target.allocate()
        except (RuntimeError, MemoryError) as e:  # no memory for it: the restore will say so, not the start
            log.warning("restore memory made ready for %d agent(s) only: %s", agents, e)
            break
        target.take()  # dropped here: back into MLX's buffer cache, pages touched
        agents, made = agents + 1, made + size
    return RestoreReserve(agents, made, time.perf_counter() - t0)


_raised_from: int | None = None  # MLX's cache limit before reserve_restores raised it (CPU)


def _raise_cache_limit(extra: int) -> None:
    global _raised_from
    import mlx.core as mx

    previous = mx.set_cache_limit(1 << 62)  # read by raising it: a lower limit would free buffers
    mx.set_cache_limit(previous + extra)
    if _raised_from is None:
        _raised_from = previous


def give_back_unused() -> None:
    """MLX's freed buffers back to the system (after a cache is let go, or when memory is
    short), the restore reserve with them, and MLX's cache limit back to what it was
    before the reserve raised it: from then on it keeps no more than it did."""
    global _raised_from
    import mlx.core as mx

    if _raised_from is not None:
        mx.set_cache_limit(_raised_from)
        _raised_from = None
    mx.clear_cache()
