"""Which MLX backend this process computes on: "metal", "cuda" or "cpu" -- decided here only.

Everything that depends on it asks `backend()`: the OpenBLAS re-exec and the CPU-only
rewrites of the model (`agentd.blas`, `agentd.device`) happen on "cpu" alone, the kernel
warm-up (`agentd.warmup`) on "cuda". The `mlx[cpu]` wheel on Linux reports no GPU backend;
`mlx[cuda13]` reports CUDA when an NVIDIA GPU is usable. This module imports nothing but
`mlx.core` (and that only when asked), so the daemon can decide before its re-exec.
"""

from __future__ import annotations

METAL, CUDA, CPU = "metal", "cuda", "cpu"


def decide_backend(*, default_is_gpu: bool, metal: bool, cuda: bool) -> str:
    """The backend MLX computes on, from what it reports (a pure function, tested as such).

    The CPU when the default device is the CPU or no GPU backend is available; otherwise
    the GPU backend that is there.
    """
    if default_is_gpu and metal:
        return METAL
    if default_is_gpu and cuda:
        return CUDA
    return CPU


def backend() -> str:
    """The backend this process's MLX computes on: "metal", "cuda" or "cpu"."""
    import mlx.core as mx

    metal = getattr(mx, "metal", None)
    cuda = getattr(mx, "cuda", None)
    return decide_backend(
        default_is_gpu=mx.default_device() == mx.gpu,
        metal=bool(metal is not None and metal.is_available()),
        cuda=bool(cuda is not None and cuda.is_available()),
    )
