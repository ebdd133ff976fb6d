"""Compile the GPU kernels a turn will need before the daemon reports ready.

MLX's CUDA backend compiles a kernel (NVRTC) the first time a shape class needs it and
keeps the result in a disk cache. Measured on an H200 with a llama-8B-shaped 4-bit model
(`benchmarks/gpu.py probe`), with empty caches: the first 2,048-token prefill took 60 s
(the 64-row quantized matmul tile, gathers, a fused SiLU), the first 32-token forward 47 s
(the 32-row tile), the first 8-token forward 46 s (the 16-row tile); one-token decode and
2-5 token forwards compiled nothing new, nor did anything at any context length up to
32k. A second process loaded all of it from the disk cache in well under a second. A
user's turn must not pay those minutes, so at start agentd runs the shapes its turns use
-- a full prefill chunk, the short prefill lengths up to it in powers of two, then several
turns at once through the daemon's own stepper (batched decode over merged caches, rows
joining and leaving, both samplers) -- and only then binds its socket.

The disk cache goes to agentd's own cache directory (`ptx_cache_dir`) rather than MLX's
default under /tmp, which many systems empty at boot: a restart after a reboot would
otherwise compile everything again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .backend import CUDA, backend
from .switches import switched_off

PTX_ENV = "MLX_PTX_CACHE_DIR"  # read by MLX's CUDA backend at its first compile
SWITCH_ENV = "AGENTD_WARMUP"  # "off" skips the warm-up (a start then compiles on demand)


@dataclass(frozen=True)
class WarmupReport:
    seconds: float
    passes: int  # forward passes and scheduler steps run
    lengths: tuple[int, ...]  # tokens per single-sequence pass, in order
    max_batch: int = 0  # the most rows one batched decode pass carried

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "passes": self.passes, "lengths": list(self.lengths),
                "max_batch": self.max_batch}


def should_warm(backend: str, env: Mapping[str, str]) -> bool:
    """Warm up on CUDA only (Metal ships its kernels precompiled; the CPU has nothing to
    compile), unless switched off."""
    return backend == CUDA and not switched_off(env.get(SWITCH_ENV))


def ptx_cache_dir(env: Mapping[str, str], cache_root: Path, mlx_version: str) -> Path | None:
    """Where MLX should keep compiled kernels: None when the user chose already (the
    variable is set), else a folder per MLX version under agentd's cache directory."""
    if env.get(PTX_ENV):
        return None
    return Path(cache_root) / "mlx-ptx" / mlx_version


def use_persistent_ptx_cache() -> Path | None:
    """On CUDA, point MLX's kernel cache at agentd's cache directory unless the user chose
    one. Call before the first GPU kernel runs. Returns the folder chosen, or None."""
    import mlx.core as mx
    import platformdirs

    if backend() != CUDA:
        return None

    root = Path(platformdirs.user_cache_dir("agentd", appauthor=False))
    chosen = ptx_cache_dir(os.environ, root, mx.__version__)
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        os.environ[PTX_ENV] = str(chosen)
    return chosen


def warm_lengths(chunk: int) -> tuple[int, ...]:
    """Tokens per forward pass: a full chunk first (its attention over an empty cache), then
    1, 2, 4, ... up to the chunk over a cache holding it (the quantized matmul picks its
    tile by rows; the probe found one class per power of two at most)."""
    short = []
    n = 1
    while n < chunk:
        short.append(n)
        n *= 2
    return (chunk, *short, chunk)


# The concurrent phase: turns that join and leave one batch as the scheduler runs them
# (prompt tokens, reply tokens, temperature): batched decode of 2..8 rows over left-padded
# caches, interleaved prefill, rows leaving the batch, both samplers.
CONCURRENT_TURNS = ((5, 4, 0.0), (9, 6, 0.7), (17, 8, 0.0), (33, 10, 0.7), (70, 5, 0.0), (130, 7, 0.7),
                    (260, 9, 0.0), (3, 3, 0.7))


def warm_up(engine, block_tokens: int = 256, read_threads: int = 8) -> WarmupReport:
    """Run every shape class a turn uses through `engine`'s model once, on throwaway caches:
    one sequence over the lengths of `warm_lengths`, then `CONCURRENT_TURNS` at once through
    the daemon's own stepper (batched decode, as when several agents answer together).
    Also pins the host memory a restore stages its blocks in (`cuda_copy`), one block per
    read thread, so the first restore does not pay for it."""
    import mlx.core as mx

    from .protocol import Sampling
    from .sequence import Sequence
    from .stepper import Stepper

    t0 = time.perf_counter()
    model = engine.model
    vocab = max(2, min(getattr(getattr(model, "args", None), "vocab_size", 256) or 256, 1000))
    lengths = warm_lengths(engine.prefill_chunk)
    cache = engine.new_cache()
    start = 0
    for n in lengths:
        ids = [(start + i) % vocab for i in range(n)]
        model(mx.array(ids)[None], cache=cache)
        mx.eval([c.state for c in cache])
        start += n
    _reserve_staging(cache, block_tokens, read_threads)
    del cache
    stepper = Stepper(engine)
    seqs = [Sequence(engine, engine.new_cache(), [], [(7 * i + j) % vocab for j in range(n)],
                     Sampling(max_tokens=m, temperature=t, top_p=0.9 if t else 1.0, seed=i))
            for i, (n, m, t) in enumerate(CONCURRENT_TURNS)]
    steps = 0
    while seqs:
        stepper.step(seqs)
        steps += 1
        for s in [s for s in seqs if s.done]:
            stepper.release(s)
            seqs.remove(s)
    mx.clear_cache()
    return WarmupReport(time.perf_counter() - t0, len(lengths) + steps, lengths, stepper.max_batch)


def _reserve_staging(cache: list, block_tokens: int, read_threads: int) -> None:
    from . import cuda_copy
    from .kvrows import layout_of

    layout = layout_of(cache)
    staging = cuda_copy.staging()
    if layout is None or staging is None:
        return
    try:
        staging.reserve(layout.row_bytes() * block_tokens, read_threads)
    except cuda_copy.CudaError as e:
        cuda_copy.disable(str(e))
