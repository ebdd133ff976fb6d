"""Give MLX's CPU backend a fast BLAS on Linux.

The `mlx[cpu]` wheel links the reference (netlib) BLAS it bundles in `mlx_cpu.libs`, and
`libmlx.so` takes `cblas_sgemm` from it by dynamic symbol lookup. A system OpenBLAS named in
LD_PRELOAD is searched first and so wins every BLAS and LAPACK symbol -- about 10x on a
prefill. LD_PRELOAD is read only when a process starts, so the daemon's entry point calls
`maybe_reexec_with_fast_blas(sys.argv)` before anything imports mlx.

PyPI offers no drop-in: `scipy-openblas32` and numpy's bundled OpenBLAS export only
`scipy_`-prefixed symbols, which MLX never looks up. (numpy's copy is still used directly:
see `agentd.device`.)

In front of OpenBLAS goes `gemv_forward.c`, compiled once per version and CPU into the user
cache directory: it runs MLX's 1-32-row `cblas_sgemm` calls (decode steps, batched decode,
short prefills) in a kernel that reads the weights once, where Debian's OpenBLAS 0.3.21
runs them far below the memory bound. Without a C compiler the daemon still runs;
`agentd.device` then routes one-row products through numpy.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import clib
from .switches import switched_off

ENV_SWITCH = "AGENTD_BLAS"  # "off" disables; a path names the library to preload
ENV_MARKER = "AGENTD_BLAS_REEXEC"  # set on the re-executed process: never exec twice
FORWARD_SWITCH = "AGENTD_GEMV_FORWARD"  # "off": preload OpenBLAS without the forwarder
FORWARD_SOURCE = Path(__file__).with_name("gemv_forward.c")
FORWARD_STEM = "libagentd_gemv_forward"
NO_FORWARD_NOTICE = (
    "agentd: no C compiler to build the few-row sgemm forwarder; "
    "decode runs slower (install gcc)"
)
NOTICE = (
    "agentd: using MLX's bundled reference BLAS; "
    "install libopenblas0-pthread for ~10x faster prefill"
)

# Debian/Ubuntu (libopenblas0-pthread), then Fedora/Arch-style names.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class Decision:
    """What to do at start-up: `exec_env` set means re-exec with it; `notice` goes to stderr."""

    library: str | None
    exec_env: dict[str, str] | None
    notice: str | None


def find_openblas(candidates: Sequence[str] = CANDIDATES) -> str | None:
    """The first existing OpenBLAS among `candidates`, or None."""
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def default_threads() -> int:
    """BLAS threads: the CPUs this process may run on, at most 8 (decode is memory-bound)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def build_gemv_forward(cache_dir: Path | None = None, compiler: str | None = None) -> str | None:
    """The compiled `gemv_forward.c` (`clib.build`: once per source, machine and CPU, into the
    user cache directory); None when there is no C compiler or the build fails."""
    return clib.build(FORWARD_SOURCE, FORWARD_STEM, cache_dir, compiler)


def decide(
    env: Mapping[str, str],
    platform: str = sys.platform,
    candidates: Sequence[str] = CANDIDATES,
    build_forwarder: Callable[[], str | None] | None = None,
) -> Decision:
    """The start-up decision as a function of the environment (tested without exec).

    `build_forwarder` (default `build_gemv_forward`) is called only when a re-exec will
    happen and the forwarder is not switched off; it returns the forwarder's path or None.
    """
    setting = env.get(ENV_SWITCH, "").strip()
    if platform != "linux" or switched_off(setting):
        return Decision(None, None, None)
    preload = env.get("LD_PRELOAD", "")
    if env.get(ENV_MARKER) or "openblas" in preload:
        return Decision(_preloaded_openblas(preload), None, None)
    library = setting if setting and setting.lower() != "on" else find_openblas(candidates)
    if library is None or not os.path.isfile(library):
        return Decision(None, None, NOTICE)
    notice = None
    front = [library]
    if not switched_off(env.get(FORWARD_SWITCH)):
        forwarder = (build_forwarder or build_gemv_forward)()
        if forwarder:
            # First, so MLX's lookup of cblas_sgemm finds it; it forwards to the next one.
            front.insert(0, forwarder)
        else:
            notice = NO_FORWARD_NOTICE
    new = dict(env)
    new["LD_PRELOAD"] = ":".join([*front, preload] if preload else front)
    new[ENV_MARKER] = "1"
    new.setdefault("OPENBLAS_NUM_THREADS", str(default_threads()))
    return Decision(library, new, notice)


def _preloaded_openblas(preload: str) -> str | None:
    return next((p for p in preload.replace(" ", ":").split(":") if "openblas" in p), None)


def maybe_reexec_with_fast_blas(argv: Sequence[str] | None = None) -> Decision:
    """Re-exec this process with OpenBLAS preloaded when that helps; call first thing.

    Returns only when no exec happens (not Linux, disabled, already preloaded, or no
    OpenBLAS found -- the last prints `NOTICE` on stderr). Must run before mlx is imported
    in this process for the preload to matter, so before any `agentd` module that imports
    mlx.
    """
    argv = list(sys.argv if argv is None else argv)
    decision = decide(os.environ)
    if decision.notice:
        print(decision.notice, file=sys.stderr)
    if decision.exec_env is None:
        return decision
    sys.stderr.flush()
    sys.stdout.flush()
    # sys.orig_argv keeps interpreter flags such as -m; argv alone would lose them.
    args = list(getattr(sys, "orig_argv", None) or [sys.executable, *argv])
    os.execve(sys.executable, args, decision.exec_env)
    raise AssertionError("unreachable")  # pragma: no cover


def gemv_forward_active(pid: int | str = "self") -> bool:
    """True when a process (this one by default) has the few-row sgemm forwarder mapped."""
    try:
        return FORWARD_STEM in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def mlx_blas(pid: int | str = "self") -> str:
    """Which BLAS a process (this one by default) has mapped for MLX: "openblas", "reference"
    or "unknown"."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.rsplit(" ", 1)[-1] for line in maps.splitlines() if ".so" in line}
    if any("openblas" in lib and "scipy" not in lib for lib in libs):
        return "openblas"
    if any("mlx_cpu.libs/libblas" in lib for lib in libs):
        return "reference"
    return "unknown"
