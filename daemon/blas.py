"""Give MLX's CPU backend a fast BLAS on Linux.

The `mlx[cpu]` wheel links the reference (netlib) BLAS it bundles in `mlx_cpu.libs`, and
`libmlx.so` takes `cblas_sgemm` from it by dynamic symbol lookup. A system OpenBLAS named in
LD_PRELOAD is searched first and so wins every BLAS and LAPACK symbol -- about 10x on a
prefill. LD_PRELOAD is read only when a process starts, so the daemon's entry point calls
`maybe_reexec_with_fast_blas(sys.argv)` before anything imports mlx.

PyPI offers no drop-in: `scipy-openblas32` and numpy's bundled OpenBLAS export only
`scipy_`-prefixed symbols, which MLX never looks up. (numpy's copy is still used directly:
see `agentd.device`.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

ENV_SWITCH = "AGENTD_BLAS"  # "off" disables; a path names the library to preload
ENV_MARKER = "AGENTD_BLAS_REEXEC"  # set on the re-executed process: never exec twice
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


def decide(
    env: Mapping[str, str],
    platform: str = sys.platform,
    candidates: Sequence[str] = CANDIDATES,
) -> Decision:
    """The start-up decision as a pure function of the environment (tested without exec)."""
    setting = env.get(ENV_SWITCH, "").strip()
    if platform != "linux" or setting.lower() in ("off", "0", "no", "false"):
        return Decision(None, None, None)
    preload = env.get("LD_PRELOAD", "")
    if env.get(ENV_MARKER) or "openblas" in preload:
        return Decision(_preloaded_openblas(preload), None, None)
    library = setting if setting and setting.lower() != "on" else find_openblas(candidates)
    if library is None or not os.path.isfile(library):
        return Decision(None, None, NOTICE)
    new = dict(env)
    new["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    new[ENV_MARKER] = "1"
    new.setdefault("OPENBLAS_NUM_THREADS", str(default_threads()))
    return Decision(library, new, None)


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
