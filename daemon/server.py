"""The Unix socket: single instance, private socket, one task per connection, clean shutdown.

Each connection is a sequence of request/response exchanges (hello first). Frames are
decoded here and handed to `Daemon.handle` as typed requests; nothing a client sends can
raise past this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from . import framing
from . import protocol as p
from . import responses
from .core import Daemon
from .errors import StartupError  # noqa: F401 (cli.py imports it from here)
from .notify import notify
from .paths import MAX_SOCKET_PATH
from .peercred import peer_uid

log = logging.getLogger("agentd.server")

MAX_CONNECTIONS = 64
TICK_S = 1.0
DRAIN_TIMEOUT_S = 60.0


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise StartupError(
            f"socket path is {len(os.fsencode(str(path)))} bytes, longer than this system allows "
            f"({MAX_SOCKET_PATH}): {path}; choose a shorter --socket"
        )


def prepare_socket_dir(path: Path) -> None:
    """The socket's directory: created 0700, and refused if someone else could get in."""
    d = path.parent
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid():
        raise StartupError(f"{d} belongs to another user; refusing to put the socket there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(d, 0o700)


def acquire_instance_lock(home: Path) -> int:
    """Held for the daemon's lifetime; the kernel releases it however the process ends."""
    fd = os.open(home / "agentd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another agentd is already running with home {home}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim_socket(path: Path) -> None:
    """Refuse if a live daemon answers on `path`; remove it if it is a stale leftover."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise StartupError(f"cannot check existing socket {path}: {e}") from e
    finally:
        probe.close()
    raise StartupError(f"another agentd is already listening on {path}")


def bind_private_socket(path: Path) -> socket.socket:
    """Bind with a umask so the socket is 0600 from its first instant, then listen."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    sock.setblocking(False)
    return sock


class Server:
    def __init__(self, daemon: Daemon, socket_path: Path, idle_timeout: float = 300.0, front_ends: list = ()):
        self.daemon = daemon
        self.front_ends = list(front_ends)  # other listeners (HTTP), each with `async stop()`
        self.socket_path = Path(socket_path)
        self.idle_timeout = idle_timeout
        self._conns: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        daemon.on_shutdown = lambda why: self._stop.set()

    async def serve(self, sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        server = await asyncio.start_unix_server(self._connection, sock=sock, limit=2**16)
        notify("READY=1\nSTATUS=serving")
        log.info("listening on %s (model %s)", self.socket_path, self.daemon.engine.model_id)
        ticker = asyncio.create_task(self._ticker())
        await self._stop.wait()

        notify("STOPPING=1")
        server.close()
        for front in self.front_ends:
            await front.stop()  # in-flight turns were told to stop; their handlers answer first
        ticker.cancel()
        # In-flight chats were told to stop; give them a bounded time to hand back.
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=DRAIN_TIMEOUT_S)
        saved = await self.daemon.final_flush()
        log.info("saved %d agent(s) on shutdown", len(saved))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return 0

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_signal(signame: str) -> None:
            if self.daemon.stopping and signame == "SIGINT":
                log.warning("second SIGINT: exiting now without the final flush")
                os._exit(130)
            self.daemon.request_shutdown(signame)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)

    async def _ticker(self) -> None:
        while True:
            # A flush interval shorter than the tick would otherwise be rounded up to it.
            await asyncio.sleep(min(TICK_S, self.daemon.flush.interval_s))
            try:
                await self.daemon.tick()
            except Exception:
                log.exception("periodic tick failed")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is not None and uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                await self._send(writer, responses.error(None, p.ErrorCode.BAD_REQUEST, "agentd serves only its own user"))
                return
            if self._slots.locked():
                await self._send(writer, responses.error(None, p.ErrorCode.BUSY, "too many connections"))
                return
            async with self._slots:
                await self._serve_connection(reader, writer)
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, frame: dict) -> None:
        """Write one frame. A client that reads nothing for the idle timeout is dropped: its
        unread replies would otherwise hold the connection (and a slot) forever."""
        try:
            await asyncio.wait_for(framing.write_frame(writer, frame), timeout=self.idle_timeout)
        except asyncio.TimeoutError:
            writer.transport.abort()  # close() would wait for the unread buffer to drain
            raise ConnectionResetError("the client stopped reading") from None

    async def _serve_connection(self, reader, writer) -> None:
        greeted = False
        while not self._stop.is_set():
            try:
                wire = await asyncio.wait_for(framing.read_frame(reader), timeout=self.idle_timeout)
            except asyncio.TimeoutError:
                return  # idle or stalled mid-frame: the connection holds nothing after this
            except framing.FrameTooLarge as e:
                await self._send(writer, responses.error(None, p.ErrorCode.BAD_FRAME, str(e)))
                return  # the rest of an oversized body cannot be skipped safely
            except framing.FrameError as e:
                await self._send(writer, responses.error(None, p.ErrorCode.BAD_FRAME, str(e)))
                return
            if wire is None:
                return
            try:
                rid, req = p.request_from_wire(wire)
            except p.ProtocolError as e:
                await self._send(writer, responses.error(p.peek_request_id(wire), e.code, e.message))
                continue
            if not greeted and req.op not in ("hello", "ping"):
                await self._send(
                    writer, responses.error(rid, p.ErrorCode.PROTOCOL_MISMATCH, "send hello first")
                )
                continue
            greeted = greeted or req.op == "hello"

            async def emit(frame: dict | None) -> None:
                if reader.at_eof() or writer.is_closing():
                    raise ConnectionResetError("client went away")
                if frame is not None:
                    await self._send(writer, frame)

            async def receive() -> dict:
                try:
                    wire = await asyncio.wait_for(framing.read_frame(reader), timeout=self.idle_timeout)
                except asyncio.TimeoutError:
                    raise ConnectionResetError("the client stalled in the middle of an upload") from None
                except framing.FrameError as e:
                    await self._send(writer, responses.error(None, p.ErrorCode.BAD_FRAME, str(e)))
                    raise ConnectionResetError("a bad frame in the middle of an upload") from None
                if wire is None:
                    raise ConnectionResetError("the client went away in the middle of an upload")
                return wire

            reply = await self.daemon.handle(rid, req, emit, receive)
            await self._send(writer, reply)
            if reply.get("type") == "error" and req.op == "hello":
                return
