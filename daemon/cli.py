"""`agentd`: run the daemon in the foreground (launchd or systemd supervise it; it never forks)."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path

import click

from . import __version__, paths

EX_CONFIG = 78  # sysexits.h: the configuration is wrong; see the systemd unit
PRIVATE_UMASK = 0o077


def _make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) 0700. One that exists is left as it is."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # _run reports it in one line (the home must exist to take the lock)

def _size(ctx, param, value):
    from .memory import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _setup_logging(level: str, log_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(fmt)
    root.addHandler(stderr)
    try:
        _make_private_dir(log_dir)
        # The daemon rotates its own log: launchd's StandardErrorPath would grow forever.
        rotating = logging.handlers.RotatingFileHandler(log_dir / "agentd.log", maxBytes=5 * 2**20, backupCount=3)
        rotating.setFormatter(fmt)
        root.addHandler(rotating)
    except OSError as e:
        root.warning("cannot write the log file in %s: %s", log_dir, e)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(path_type=Path), envvar="AGENTD_HOME", default=None,
              help="Data, records, caches and log. [default: the platform's state dir]")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="AGENTD_SOCKET", default=None,
              help="Unix socket to listen on. [default: a private runtime dir]")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), envvar="AGENTD_MODEL", default=None,
              help="An mlx-lm model folder. [default: SmolLM2-135M-Instruct, converted on first use]")
@click.option("--flush-interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              envvar="AGENTD_FLUSH_INTERVAL", help="Seconds between saves of changed agents.")
@click.option("--max-hot", type=click.IntRange(min=1), default=8, show_default=True, envvar="AGENTD_MAX_HOT",
              help="Most agents kept in memory.")
@click.option("--cache-budget", callback=_size, default="4GB", show_default=True, envvar="AGENTD_CACHE_BUDGET",
              help="Bytes of KV cache kept in memory, e.g. 4GB.")
@click.option("--min-available", callback=_size, default="1GB", show_default=True, envvar="AGENTD_MIN_AVAILABLE",
              help="Evict when the system has less free memory than this.")
@click.option("--preload", type=click.IntRange(min=0), default=0, show_default=True, envvar="AGENTD_PRELOAD",
              help="Load the N most recently used agents at start.")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              envvar="AGENTD_IDLE_TIMEOUT", help="Close connections silent for this many seconds.")
@click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None, envvar="AGENTD_KV_BITS",
              help="Quantize the KV cache of full-attention layers (mlx-lm QuantizedKVCache). Default: off.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              envvar="AGENTD_KV_GROUP_SIZE", help="Quantization group size for --kv-bits.")
@click.option("--block-tokens", type=click.IntRange(min=8, max=4096), default=256, show_default=True,
              envvar="AGENTD_BLOCK_TOKENS", help="Tokens per stored KV block (shared between agents).")
@click.option("--http", "http", default=None, envvar="AGENTD_HTTP", metavar="ADDR",
              help="OpenAI-compatible HTTP on HOST:PORT (:0 picks a free port), or off. "
                   "[default: 127.0.0.1:8731; skipped with a warning if that port is taken]")
@click.option("--http-allow-remote", is_flag=True, envvar="AGENTD_HTTP_ALLOW_REMOTE",
              help="Allow --http on a non-loopback address (the key is then the only guard).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, envvar="AGENTD_LOG_LEVEL")
@click.version_option(__version__, prog_name="agentd")
def main(home, socket_path, model_dir, flush_interval, max_hot, cache_budget, min_available, preload,
         idle_timeout, kv_bits, kv_group_size, block_tokens, http, http_allow_remote, log_level):
    """Keep LLM agents' KV caches in memory and on disk; serve them on a Unix socket."""
    from . import backend, blas

    # On MLX's CPU backend (Linux) only: restart with a system OpenBLAS preloaded (MLX's CPU
    # wheel links a reference BLAS ~15x slower), or say in one line why not. Asking which
    # backend imports mlx.core (0.1 s); the re-executed process imports it afresh.
    try:
        which = backend.backend()
    except ImportError as e:  # Linux: the plain mlx wheel carries no backend library
        click.echo(f"agentd: MLX cannot load ({e}); install agentd[cpu], or agentd[cuda] with an NVIDIA GPU",
                   err=True)
        sys.exit(EX_CONFIG)
    if which == backend.CPU:
        blas.maybe_reexec_with_fast_blas()
    # Before anything is created: every file and directory agentd makes (records, their
    # -wal/-shm, caches, logs, the socket dir) is private to its user from its first instant.
    os.umask(PRIVATE_UMASK)
    faulthandler.enable()
    home = (home or paths.default_home()).expanduser().resolve()
    socket_path = (socket_path or paths.default_socket()).expanduser().absolute()
    _make_private_dir(home)
    _setup_logging(log_level, paths.default_log_dir(home))
    log = logging.getLogger("agentd")
    from .http_server import DEFAULT_HTTP, HttpConfigError, parse_address

    try:
        http_address = parse_address(http or DEFAULT_HTTP, http_allow_remote)
    except HttpConfigError as e:
        click.echo(f"agentd: {e}", err=True)
        sys.exit(EX_CONFIG)
    try:
        from .kvstore import KVSettings

        kv = KVSettings(int(kv_bits) if kv_bits else None, int(kv_group_size), block_tokens)
        code = _run(home, socket_path, model_dir, flush_interval, max_hot, cache_budget, min_available, preload,
                    idle_timeout, log, kv, http_address, http_explicit=http is not None)
    except Exception as e:
        from .server import StartupError

        if isinstance(e, (StartupError, OSError)) or type(e).__name__ in ("ModelLoadError", "ConvertError"):
            click.echo(f"agentd: {e}", err=True)
            # EX_CONFIG: a supervisor restarting us cannot fix this (the unit says so).
            sys.exit(EX_CONFIG)
        raise
    # Everything is durable by now (flushed, socket removed). Skip interpreter teardown:
    # finalizing MLX objects while its threads exit can abort an otherwise clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(home, socket_path, model_dir, flush_interval, max_hot, cache_budget, min_available, preload, idle_timeout,
         log, kv, http_address=None, http_explicit=False) -> int:
    from .server import Server, StartupError, acquire_instance_lock, bind_private_socket, check_socket_path, \
        claim_socket, prepare_socket_dir

    check_socket_path(socket_path)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(home.stat().st_mode) & 0o077:
        log.warning("%s can be entered by other users (mode %o); agentd keeps its own files in it 0600, "
                    "but `chmod 700 %s` makes everything in it private", home, stat.S_IMODE(home.stat().st_mode), home)
    lock_fd = acquire_instance_lock(home)
    prepare_socket_dir(socket_path)
    claim_socket(socket_path)

    from .restore_reads import READ_THREADS
    from .convert import ensure_default_model
    from .core import Daemon, Settings
    from .device import describe
    from .engine import Engine
    from .notify import notify
    from .warmup import PTX_ENV, should_warm, use_persistent_ptx_cache, warm_up

    if model_dir is None:
        model_dir = ensure_default_model(paths.default_model_dir(home), progress=lambda m: log.info("%s", m))
    log.info("agentd %s (pid %d) loading %s", __version__, os.getpid(), model_dir)
    use_persistent_ptx_cache()  # before the first GPU kernel: compiled ones survive a reboot
    engine = Engine(Path(model_dir).expanduser(), kv_bits=kv.bits, kv_group_size=kv.group_size)
    log.info("model %s loaded in %.2fs (%s, %d MB)", engine.model_id, engine.load_s, engine.dtype,
             engine.model_bytes // 2**20)
    log.info("%s", describe(engine.plan))
    from .restore_arrays import host_read_usable, native_reader

    if host_read_usable():  # readhash is built here once per machine (~0.2 s): no restore waits for it
        log.info("restores read and check %s", "in C (readhash)" if native_reader() else "in Python")
    if should_warm(engine.plan.backend, os.environ):
        # Before the socket exists: no turn may wait while kernels are built (minutes on a
        # machine that never ran this model; under a second once they are cached).
        notify("STATUS=compiling GPU kernels")
        log.info("warming up GPU kernels (kernel cache %s)", os.environ.get(PTX_ENV, "MLX's default"))
        engine.warmup = warm_up(engine, kv.block_tokens, READ_THREADS)
        log.info("GPU kernels warm in %.2fs (%d forward passes)", engine.warmup.seconds, engine.warmup.passes)
    settings = Settings(home=home, model_dir=Path(model_dir), flush_interval=flush_interval, max_hot=max_hot,
                        cache_budget=cache_budget, min_available=min_available, preload=preload, kv=kv)
    daemon = Daemon(settings, engine)

    async def run() -> int:
        await daemon.reserve_restore_memory()  # CUDA and the CPU: before the socket, like the warm-up
        if preload:
            names = await daemon.preload(preload)
            log.info("preloaded %d agent(s)", len(names))
        front_ends = []
        if http_address is not None:
            from .http_server import HttpFrontEnd

            front = HttpFrontEnd(daemon, home, http_address)
            try:
                await front.start()
                front_ends.append(front)
            except OSError as e:
                where = "%s:%d" % http_address
                if http_explicit:
                    raise StartupError(f"cannot serve HTTP on {where}: {e.strerror or e}") from None
                # The default port is a convenience; the socket is the primary protocol.
                log.warning("HTTP: %s is taken (%s); serving the Unix socket only. Choose another port with "
                            "--http 127.0.0.1:PORT, or --http off to silence this", where, e.strerror or e)
        sock, bound = bind_private_socket(socket_path)
        return await Server(daemon, socket_path, idle_timeout=idle_timeout, front_ends=front_ends,
                            bound=bound).serve(sock)

    try:
        return asyncio.run(run())
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    main()
