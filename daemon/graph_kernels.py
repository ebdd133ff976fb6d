"""agentd's few-row attention and SwiGLU as nodes of MLX's graph (`graph_kernels.cpp`).

`agentd.fewattn` calls the kernels of the few-row library through ctypes, which needs their
inputs evaluated first: one MLX evaluation per layer, a loss for decode steps. This C++
module wraps the same kernels in MLX primitives, so they run on MLX's stream thread between
its own operations and a forward pass stays one lazy graph. It is compiled once per source,
MLX, nanobind, Python and machine into the user cache directory, with the system C++
compiler, against the installed MLX's headers and `libmlx` and nanobind's sources, in MLX's
nanobind domain ("mlx": otherwise `mlx.core.array` arguments would not convert).

The module also makes a restore's arrays without writing them (`unwritten`, for
agentd.restore_arrays): `loaded()` is the module this process loaded, if any.

Optional like the rest: without a C++ compiler, nanobind, or an MLX whose nanobind build
matches this one, `load` says why and `agentd.fewattn` keeps its ctypes path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import logging
import importlib.util
import os
import platform
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from . import clib

log = logging.getLogger("agentd.graph_kernels")

SOURCE = Path(__file__).with_name("graph_kernels.cpp")
MODULE = "_agentd_graph_kernels"  # NB_MODULE's name: the init function the loader looks up
ENV_SWITCH = "AGENTD_GRAPH_KERNELS"  # "off": the ctypes path of agentd.fewattn
# MLX's Python bindings register their types in this nanobind domain (NB_DOMAIN), and an
# extension sees them only from the same one.
NANOBIND_DOMAIN = "mlx"


def _parts() -> dict[str, Path | str] | None:
    """What the build compiles against; None without nanobind or MLX's headers."""
    try:
        import nanobind
    except ImportError:
        return None
    import mlx
    import mlx.core as mx

    root = Path(mx.__file__).parent if getattr(mx, "__file__", None) else Path(next(iter(mlx.__path__)))
    nb_root = Path(nanobind.__file__).parent
    parts = {
        "mlx_include": root / "include",
        "mlx_lib": root / "lib",
        "nanobind_include": Path(nanobind.include_dir()),
        "nanobind_source": Path(nanobind.source_dir()) / "nb_combined.cpp",
        "robin_map": nb_root / "ext" / "robin_map" / "include",
        "python_include": Path(sysconfig.get_paths()["include"]),
        "mlx_version": mx.__version__,
        "nanobind_version": nanobind.__version__,
    }
    needed = ("mlx_include", "mlx_lib", "nanobind_include", "nanobind_source", "robin_map", "python_include")
    if not all(Path(parts[k]).exists() for k in needed):
        return None
    return parts


def build(cache_dir: Path | None = None, compiler: str | None = None) -> str | None:
    """The compiled module's path, built if it is not there yet (~20 s on 2 cores); None
    without a C++ compiler, nanobind or MLX's headers, or when the build fails."""
    parts = _parts()
    if parts is None:
        return None
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = b"\0".join([
        SOURCE.read_bytes(), str(parts["mlx_version"]).encode(), str(parts["nanobind_version"]).encode(),
        suffix.encode(), platform.machine().encode(), str(parts["mlx_lib"]).encode(),
    ])
    target = (cache_dir or clib.default_cache_dir()) / f"{MODULE}-{hashlib.sha256(key).hexdigest()[:12]}{suffix}"
    if target.is_file():
        return str(target)
    cxx = shlex.split(compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "")
    if not cxx:
        return None
    log.info("building agentd's graph kernels into %s (once, ~15 s)", target.parent)
    command = [
        *cxx, "-std=c++20", "-O2", "-DNDEBUG", "-shared", "-fPIC", "-fvisibility=hidden",
        f"-DNB_DOMAIN={NANOBIND_DOMAIN}",
        *(f"-I{parts[k]}" for k in ("nanobind_include", "robin_map", "python_include", "mlx_include")),
        str(SOURCE), str(parts["nanobind_source"]),
        f"-L{parts['mlx_lib']}", "-lmlx", f"-Wl,-rpath,{parts['mlx_lib']}",
    ]
    return clib.build_cached(target, [command], timeout=600)


def load(attention_address: int, swiglu_address: int, path: str | Path | None = None) -> tuple[ModuleType | None, str]:
    """The module bound to the few-row library's `agentd_attention` and `agentd_swiglu` (their
    addresses), built first if need be, and checked on a small call; or None and why not."""
    if sys.platform != "linux":
        return None, "only on Linux's CPU path"
    path = path or build()
    if path is None:
        return None, "not built (needs a C++ compiler and nanobind)"
    try:
        loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
        spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        module.bind(attention_address, swiglu_address)
        if not _works(module):
            return None, "its results do not match MLX's"
        global _loaded
        _loaded = module
        return module, ""
    except (ImportError, OSError, TypeError, ValueError, RuntimeError) as e:
        # TypeError: an MLX built with another nanobind, whose arrays this module cannot take.
        return None, f"not usable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


_loaded: ModuleType | None = None  # the module `load` returned last, checked


def loaded() -> ModuleType | None:
    """The module this process loaded (agentd.fewattn loads it with the few-row library), or
    None: what agentd.restore_arrays asks for its `unwritten` arrays."""
    return _loaded


def _works(module: ModuleType) -> bool:
    import mlx.core as mx

    gate = mx.array([[-2.0, -0.5, 0.0, 0.5, 1.0, 3.0, 7.0, -9.0, 0.25]])
    up = mx.arange(9, dtype=mx.float32)[None]
    expected = gate * mx.sigmoid(gate) * up
    q = mx.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # 1 sequence, 2 query heads, 1 row, D = 2
    k = mx.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # 1 KV head, 2 keys
    v = mx.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    got = module.attention(q, k, v, 1.0, 0, None)
    want = mx.softmax(q @ k.transpose(0, 1, 3, 2), axis=-1) @ v
    return bool(mx.allclose(module.swiglu(gate, up), expected, atol=1e-5).item()
                and mx.allclose(got, want, atol=1e-5).item())
