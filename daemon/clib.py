"""agentd's C sources compiled once per source, machine and CPU into the user cache directory.

Two libraries are built this way: `gemv_forward.c` (the few-row products and attention that
`agentd.blas` preloads in front of OpenBLAS) and `readhash.c` (a restore's read and checksum
in one pass, `agentd.readhash`); `agentd.graph_kernels` builds its C++ module through
`build_cached`. Each is optional: without a compiler the daemon runs, on slower paths.
"""

from __future__ import annotations

import hashlib
import os
import platform as _platform
import shlex
import shutil
import subprocess
from pathlib import Path


def _cpu_signature() -> bytes:
    """What a -march=native build depends on: the CPU's model and feature flags (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return b""
    keep = ("model name", "flags", "Features", "CPU part")
    lines = {line.split(":", 1)[0].strip(): line for line in info.splitlines() if ":" in line}
    return "\n".join(lines[k] for k in keep if k in lines).encode()


def default_cache_dir() -> Path:
    """Where built libraries live: the user cache directory (`~/.cache/agentd` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("agentd", appauthor=False))


def build(source_path: Path, stem: str, cache_dir: Path | None = None, compiler: str | None = None) -> str | None:
    """The compiled `source_path` as `{stem}-{hash}.so` in `cache_dir` (the user cache
    directory by default), built if it is not there yet; None when there is no C compiler or
    the build fails.

    Built for this CPU (-march=native) when the compiler accepts that, else for the compiler's
    generic target; the CPU's flags are in the file name's hash, so a home directory shared
    with another kind of machine gets a build of its own.
    """
    source = source_path.read_bytes()
    digest = hashlib.sha256(source + _platform.machine().encode() + _cpu_signature()).hexdigest()[:12]
    target = (cache_dir or default_cache_dir()) / f"{stem}-{digest}.so"
    if target.is_file():
        return str(target)
    cc = shlex.split(compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "")
    if not cc:
        return None
    common = ["-O3", "-shared", "-fPIC", str(source_path), "-ldl", "-lpthread"]
    return build_cached(target, [[*cc, *flags, *common] for flags in (["-march=native"], [])])


def build_cached(target: Path, attempts: list[list[str]], timeout: float = 120) -> str | None:
    """`target` built by the first of `attempts` (compiler commands, each completed with
    `-o <temp name>`) that succeeds, unless it exists already; None when all fail.

    Another process may be building the same file: each writes its own temp name and the
    rename is atomic, so a reader never maps a half-written library."""
    if target.is_file():
        return str(target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for i, command in enumerate(attempts):
            try:
                subprocess.run([*command, "-o", str(partial)], check=True, capture_output=True, timeout=timeout)
                break
            except subprocess.CalledProcessError:
                if i == len(attempts) - 1:
                    raise
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError):
        partial.unlink(missing_ok=True)
        return None
    return str(target)
