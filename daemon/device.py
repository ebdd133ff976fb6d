"""Adapt a loaded mlx-lm model to the device it runs on.

`agentd.backend` is the one place that says which MLX backend computes: "metal" (Apple
Silicon), "cuda" (an NVIDIA GPU through the `mlx[cuda13]` wheels) or "cpu". On Metal and
CUDA the quantized weights stay as they are: MLX's GPU kernels for them are the fast
path, and a 4-bit model stays 4-bit. On MLX's CPU backend (Linux) its quantized kernels
run at a few tokens/s, so `prepare_for_device` dequantizes every quantized layer to
float32 -- the one dtype with a BLAS behind it on the CPU. A decode step is bound by
reading the weights, and MLX issues every product as `sgemm`, few-row ones too, which Debian's OpenBLAS 0.3.21
runs far below the memory bound. When `agentd.blas` preloaded its forwarder, MLX's 1-32-row
`sgemm` calls already reach its streaming kernel and the model stays pure MLX. Without it,
one-row products leave MLX for numpy's bundled OpenBLAS `sgemv`: still 2x faster than the
`sgemm`, but every round trip is an MLX evaluation (40 vs 30 ms a step on SmolLM2-135M).
With the forwarder, attention over queries of few rows runs in its library too (`agentd.fewattn`).

The compute dtype is recorded in the plan, so a KV cache file can say what made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backend import CPU, CUDA, METAL, backend, decide_backend  # noqa: F401  (decide_backend: re-exported)

# On the CPU only float32 reaches a BLAS; MLX's own float16/bfloat16 matmuls measured 5-15x
# slower there (benchmarks/cpu_backend.py prints the comparison).
CPU_COMPUTE_DTYPE = "float32"
# A 2,048-token prompt prefilled at 190 tok/s in chunks of 256, 173 in 512, 67 in one pass
# (the CPU attention materialises the full score matrix); mlx-lm's default is 2,048.
CPU_PREFILL_CHUNK = 256
GPU_PREFILL_CHUNK = 2048
METAL_PREFILL_CHUNK = GPU_PREFILL_CHUNK  # the name older callers import

_DESCRIBED = {METAL: "Metal", CUDA: "CUDA"}


@dataclass(frozen=True)
class DevicePlan:
    """What `prepare_for_device` did; `compute_dtype` is the dtype of activations and KV."""

    device: str  # "gpu" or "cpu"; `backend` says which GPU
    compute_dtype: str  # e.g. "float32"; recorded in cache files
    dequantized: int  # number of layers dequantized (0 on Metal)
    gemv_rows: int  # products with at most this many rows go through numpy (0: never)
    blas: str  # the BLAS MLX's own matmuls reach, as `agentd.blas.mlx_blas()` names it
    prefill_chunk: int  # tokens per forward pass when prefilling a long prompt
    # What runs one-row products: "forwarded" (MLX's 1-32-row sgemm taken by agentd.blas's
    # forwarder), "numpy" (numpy's sgemv) or "sgemm" (MLX as is); "" on Metal.
    one_row: str = ""
    backend: str = ""  # "metal", "cuda" or "cpu" (`decide_backend`)
    quantized: int = 0  # layers left quantized, as loaded (0 on the CPU, which dequantizes them)
    # What runs attention over queries of up to `fewattn.MAX_QUERY_ROWS` rows: "graph" (the
    # few-row library's kernels as nodes of MLX's graph, `agentd.graph_kernels`), "agentd"
    # (the same kernels through ctypes, `agentd.fewattn`) or "mlx"; "" on a GPU.
    attention: str = ""
    graph_unavailable: str = ""  # with "agentd": why the graph kernels did not load
    # On CUDA: attention over at most this many query rows is composed of matrix products
    # instead of cuDNN's, which plans every new shape (agentd.gpu_attention); 0: not used.
    short_attention_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def on_cpu() -> bool:
    """True when MLX runs on its CPU backend (`backend()` is "cpu")."""
    return backend() == CPU


class CpuLinear(nn.Module):
    """A float32 linear layer whose one-row products run as numpy `sgemv`.

    `weight` stays an MLX parameter (so `parameters()`, saving and `nbytes` see it); `_w`
    is a zero-copy numpy view of the same memory. Replacing `weight` afterwards
    (`load_weights`, `update`) leaves `_w` stale: prepare the model after loading it.
    """

    def __init__(self, weight: mx.array, bias: mx.array | None = None, gemv_rows: int = 1):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        mx.eval(self.parameters())
        self._w = np.asarray(weight)
        self._gemv_rows = gemv_rows

    def _extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"input_dims={inp}, output_dims={out}, bias={'bias' in self}, dtype={self.weight.dtype}"

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if 0 < rows <= self._gemv_rows and x.dtype == self.weight.dtype:
            return _numpy_linear(self._w, x, self.get("bias"))
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight.T)
        return x @ self.weight.T


class CpuEmbedding(nn.Module):
    """nn.Embedding with a float32 table whose `as_linear` (tied output) runs as `sgemv`."""

    def __init__(self, weight: mx.array, gemv_rows: int = 1):
        super().__init__()
        self.weight = weight
        mx.eval(self.weight)
        self._w = np.asarray(weight)
        self._gemv_rows = gemv_rows

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, dtype={self.weight.dtype}"

    def __call__(self, x: mx.array) -> mx.array:
        return self.weight[x]

    def as_linear(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if 0 < rows <= self._gemv_rows and x.dtype == self.weight.dtype:
            return _numpy_linear(self._w, x, None)
        return x @ self.weight.T


def _numpy_linear(w: np.ndarray, x: mx.array, bias: mx.array | None) -> mx.array:
    # Forces evaluation of x: the product leaves MLX's lazy graph for numpy and comes back.
    mx.eval(x)
    xs = np.asarray(x).reshape(-1, w.shape[1])
    y = w @ xs[0] if xs.shape[0] == 1 else xs @ w.T
    # Shape in numpy: every MLX op, even a reshape, costs ~10 us of dispatch on the CPU.
    out = mx.array(y.reshape(*x.shape[:-1], w.shape[0]))
    return out + bias if bias is not None else out


def _limit_numpy_blas_threads(n: int = 1) -> bool:
    """Give numpy's own OpenBLAS `n` threads; True if it could be set.

    The one-row products it runs are memory-bound, and a second pool of spinning BLAS
    threads beside MLX's slowed a decode step several-fold on 2 cores.
    """
    import ctypes
    import glob
    import os

    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs_dir, "libscipy_openblas*.so*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def _dequantized_weight(module: nn.Module, dtype: mx.Dtype) -> mx.array:
    # Dequantize with float32 scales and biases, then cast: no float16 rounding in between.
    return mx.dequantize(
        module.weight,
        module.scales.astype(mx.float32),
        None if module.get("biases") is None else module.biases.astype(mx.float32),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
    ).astype(dtype)


def _prepare_cpu(model: nn.Module, gemv_rows: int) -> int:
    dtype = getattr(mx, CPU_COMPUTE_DTYPE)
    replaced: list[tuple[str, nn.Module]] = []
    n_dequantized = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            bias = module.get("bias")
            new = CpuLinear(
                _dequantized_weight(module, dtype),
                None if bias is None else bias.astype(dtype),
                gemv_rows,
            )
            n_dequantized += 1
        elif isinstance(module, nn.QuantizedEmbedding):
            new = CpuEmbedding(_dequantized_weight(module, dtype), gemv_rows)
            n_dequantized += 1
        elif type(module) is nn.Linear:
            bias = module.get("bias")
            new = CpuLinear(
                module.weight.astype(dtype), None if bias is None else bias.astype(dtype), gemv_rows
            )
        elif type(module) is nn.Embedding:
            new = CpuEmbedding(module.weight.astype(dtype), gemv_rows)
        else:
            continue
        replaced.append((name, new))
        # Evaluate as we go so peak memory holds one dequantized layer beside the model.
        mx.eval(new.parameters())
    if replaced:
        model.update_modules(_unflatten(replaced))
    # Norm weights and the like: activations then stay float32 end to end.
    rest = [
        (k, v.astype(dtype))
        for k, v in _flat_params(model)
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype
    ]
    if rest:
        model.load_weights(rest, strict=False)
    mx.eval(model.parameters())
    return n_dequantized


def _flat_params(model: nn.Module) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def _unflatten(items: list[tuple[str, nn.Module]]) -> Any:
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


def _model_dtype(model: nn.Module) -> str:
    # The dtype activations take: that of the first non-integer parameter (scales, for a
    # quantized layer), as mlx-lm's embedding output carries it forward.
    embed = getattr(getattr(model, "model", model), "embed_tokens", None)
    for arr in ([embed.get("scales"), embed.get("weight")] if embed is not None else []):
        if arr is not None and mx.issubdtype(arr.dtype, mx.floating):
            return _dtype_name(arr.dtype)
    for _, v in _flat_params(model):
        if mx.issubdtype(v.dtype, mx.floating):
            return _dtype_name(v.dtype)
    return "float32"


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def prepare_for_device(
    model: nn.Module,
    config: Mapping[str, Any] | None = None,
    *,
    gemv_rows: int | None = None,
    force_cpu: bool | None = None,
    device_backend: str | None = None,
) -> DevicePlan:
    """Make `model` (as `mlx_lm.load` returns it) fast on the device MLX uses; mutates it.

    Call once, after loading and before the first forward pass or cache is made. Only on
    the CPU backend is the model rewritten: every quantized layer becomes float32
    (`compute_dtype`), which also changes the dtype of new KV caches. On Metal and CUDA
    nothing changes (`quantized` counts the layers that stay quantized). `config` is
    accepted for future per-model choices and is not read yet. `device_backend` ("metal",
    "cuda", "cpu") overrides `backend()`, and `force_cpu=True` means "cpu" (tests).
    `gemv_rows` defaults to 0 when the sgemm forwarder is loaded, else 1.
    """
    from . import blas, fewattn

    chosen = device_backend or (CPU if force_cpu else backend())
    if chosen not in (METAL, CUDA, CPU):
        raise ValueError(f"unknown backend {chosen!r}")
    if chosen != CPU:
        quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        short_rows = 0
        if chosen == CUDA:
            from . import gpu_attention

            short_rows = gpu_attention.MAX_QUERY_ROWS if gpu_attention.install() else 0
        # "blas" names what runs the matrix products: MLX's own Metal kernels, or cuBLAS
        # (and MLX's quantized kernels) on CUDA.
        return DevicePlan("gpu", _model_dtype(model), 0, 0, "metal" if chosen == METAL else "cublas",
                          GPU_PREFILL_CHUNK, backend=chosen, quantized=quantized, short_attention_rows=short_rows)
    forwarded = blas.gemv_forward_active()
    if gemv_rows is None:
        gemv_rows = 0 if forwarded else 1
    n = _prepare_cpu(model, gemv_rows)
    if gemv_rows:
        _limit_numpy_blas_threads(1)
    one_row = "numpy" if gemv_rows else ("forwarded" if forwarded else "sgemm")
    # The attention kernel lives in the forwarder's library, beside the threads it shares.
    attention = fewattn.mode() if forwarded and fewattn.install(model) else "mlx"
    return DevicePlan(
        "cpu", CPU_COMPUTE_DTYPE, n, gemv_rows, blas.mlx_blas(), CPU_PREFILL_CHUNK, one_row, backend=CPU,
        attention=attention, graph_unavailable=fewattn.graph_unavailable if attention == "agentd" else "",
    )


def describe(plan: DevicePlan) -> str:
    """One line for the start-up log."""
    if plan.device == "gpu":
        name = _DESCRIBED.get(plan.backend, plan.backend or "GPU")
        kept = f" ({plan.quantized} layers quantized)" if plan.quantized else ""
        short = (f", attention of prefills up to {plan.short_attention_rows} tokens composed"
                 if plan.short_attention_rows else "")
        return f"device: {name}, weights as loaded{kept}, compute {plan.compute_dtype}{short}"
    return (
        f"device: CPU, {plan.dequantized} layers dequantized to {plan.compute_dtype}, "
        f"MLX BLAS {plan.blas}, few-row products via {_ONE_ROW[plan.one_row]}, "
        f"few-row attention via {_ATTENTION[plan.attention]}"
        + (f" (graph kernels {plan.graph_unavailable})" if plan.graph_unavailable else "")
    )


_ATTENTION = {
    "graph": "agentd's kernels in MLX's graph",
    "agentd": "agentd's kernels (ctypes)",
    "mlx": "MLX",
}

_ONE_ROW = {
    "forwarded": "agentd's few-row sgemm kernel",
    "numpy": "numpy sgemv",
    "sgemm": "MLX sgemm",
}
