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
import select
import signal
import socket
import stat
from dataclasses import dataclass
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

MAX_CONNECTIONS = 64  # greeted connections served at once
MAX_UNGREETED = 64  # connections that have not said hello yet; past this the oldest is dropped
HELLO_TIMEOUT_S = 5.0  # a connection that has not said hello by then is dropped
TICK_S = 1.0
# A stop is: the final flush, then at most DRAIN_TIMEOUT_S for replies still being sent,
# then every connection closed (at most CLOSE_TIMEOUT_S). The service files give the whole
# stop agentctl.service.spec.STOP_TIMEOUT_SECONDS (60 s) before SIGKILL, which leaves the
# flush ~50 s.
DRAIN_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 1.0


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise StartupError(
            f"socket path is {len(os.fsencode(str(path)))} bytes, longer than this system allows "
            f"({MAX_SOCKET_PATH}): {path}; choose a shorter --socket"
        )


def prepare_socket_dir(path: Path) -> None:
    """The socket's directory must be private to this user.

    A directory agentd creates is made 0700. One that already exists is never changed
    (it may be /tmp, a home, a shared folder): it is refused, with the reason, unless it
    belongs to this user and no one else can enter or write it.
    """
    d = path.parent
    try:
        d.mkdir(mode=0o700, parents=True)
        os.chmod(d, 0o700)  # ours: mkdir's mode went through the umask
        return
    except FileExistsError:
        pass
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(d)  # e.g. macOS's /tmp -> /private/tmp; judged by what it points to
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{d} is not a directory; choose another --socket")
    if st.st_uid != os.getuid():
        raise StartupError(f"{d} belongs to another user; refusing to put the socket there")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StartupError(
            f"{d} (mode {mode:o}) can be entered by other users; agentd will not put its socket there "
            f"nor change a directory it did not create: choose --socket in a directory only you can enter "
            f"(agentd creates a missing one 0700), e.g. {d / 'agentd' / path.name}"
        )


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


def bind_private_socket(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind with a umask so the socket is 0600 from its first instant, then listen.

    Returns the socket and the (st_dev, st_ino) of the file the bind made: at stop only
    that file is removed, never one another daemon put at the same path since.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    st = os.lstat(path)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)


def remove_socket_if_ours(path: Path, bound: tuple[int, int] | None) -> bool:
    """Unlink `path` only if it is still the file this daemon bound."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if bound is None or (st.st_dev, st.st_ino) != bound:
        log.warning("%s is no longer the socket this daemon bound; leaving it in place", path)
        return False
    path.unlink(missing_ok=True)
    return True


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed its end for good. A half-close (shutdown(SHUT_WR), as
    `nc -N` does after sending) is not that: the client still reads the reply."""
    poller = select.poll()
    # Asking only for POLLOUT: POLLHUP then means the peer can no longer receive (on
    # macOS, where poll rides on kqueue, a read-side EOF would also raise POLLHUP).
    poller.register(sock.fileno(), select.POLLOUT)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


@dataclass(eq=False)
class _Connection:
    """Runtime state of one client connection."""

    task: asyncio.Task
    writer: asyncio.StreamWriter
    greeted: bool = False  # hello answered; only greeted connections count against MAX_CONNECTIONS
    busy: bool = False  # a request is being handled


class Server:
    def __init__(self, daemon: Daemon, socket_path: Path, idle_timeout: float = 300.0, front_ends: list = (),
                 bound: tuple[int, int] | None = None):
        self.daemon = daemon
        self.front_ends = list(front_ends)  # other listeners (HTTP), each with `async stop()`
        self.socket_path = Path(socket_path)
        self.idle_timeout = idle_timeout
        self.bound = bound
        self._conns: dict[asyncio.Task, _Connection] = {}  # in arrival order
        self._stop = asyncio.Event()
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
        t0 = loop.time()
        server.close()
        for front in self.front_ends:
            await front.stop()  # in-flight turns were told to stop; their handlers answer first
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        # Flush first: in-flight turns were told to stop and run out ahead of the flush on
        # the worker, so the flush sees their caches; nothing below can delay it.
        saved = await self.daemon.final_flush()
        log.info("saved %d agent(s) on shutdown", len(saved))
        # Then let requests still being answered send their reply, briefly, and close
        # every connection: an idle client must not hold the stop (a service manager
        # kills a daemon that takes too long, see DRAIN_TIMEOUT_S).
        busy = [c.task for c in self._conns.values() if c.busy]
        if busy:
            await asyncio.wait(busy, timeout=DRAIN_TIMEOUT_S)
        tasks = list(self._conns)
        for conn in list(self._conns.values()):
            conn.writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        await self.daemon.close_records()
        remove_socket_if_ours(self.socket_path, self.bound)
        log.info("stopped in %.1fs", loop.time() - t0)
        return 0

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_signal(signame: str) -> None:
            if self.daemon.stopping and signame == "SIGINT":
                log.warning("second SIGINT: exiting now without the final flush")
                os._exit(130)
            self.daemon.request_shutdown(signame)

        # SIGHUP too: closing the terminal of a foreground agentd must not lose dirty caches.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig.name)

    async def _ticker(self) -> None:
        while True:
            # A flush interval shorter than the tick would otherwise be rounded up to it.
            await asyncio.sleep(min(TICK_S, self.daemon.flush.interval_s))
            try:
                await self.daemon.tick()
            except Exception:
                log.exception("periodic tick failed")

    def _make_room_for_a_greeting(self) -> None:
        """Bound the connections that have not said hello yet: past the bound, the oldest
        is dropped. A real client says hello within milliseconds of connecting, so
        connections that never do (a stalled or hostile process) cannot lock it out."""
        waiting = [c for c in self._conns.values() if not c.greeted]
        for conn in waiting[: max(0, len(waiting) - MAX_UNGREETED)]:
            conn.writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        conn = _Connection(task, writer)
        self._conns[task] = conn
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is not None and uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                await self._send(writer, responses.error(None, p.ErrorCode.PERMISSION_DENIED,
                                                         "agentd serves only its own user"))
                return
            self._make_room_for_a_greeting()
            await self._serve_connection(reader, writer, conn)
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            if self._conns.pop(task).greeted:
                self.daemon.scheduler.clients -= 1
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

    async def _serve_connection(self, reader, writer, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        hello_deadline = loop.time() + HELLO_TIMEOUT_S
        while not self._stop.is_set():
            # Before hello: the hello deadline, or the idle timeout if that comes first.
            timeout = self.idle_timeout if conn.greeted else min(self.idle_timeout, hello_deadline - loop.time())
            try:
                wire = await asyncio.wait_for(framing.read_frame(reader), timeout=max(timeout, 0))
            except asyncio.TimeoutError:
                return  # idle, stalled mid-frame, or no hello in time: it holds nothing after this
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
            if not conn.greeted and req.op not in ("hello", "ping"):
                await self._send(
                    writer, responses.error(rid, p.ErrorCode.PROTOCOL_MISMATCH, "send hello first")
                )
                continue
            if req.op == "hello" and not conn.greeted:
                if sum(c.greeted for c in self._conns.values()) >= MAX_CONNECTIONS:
                    await self._send(writer, responses.error(rid, p.ErrorCode.BUSY, "too many connections"))
                    return

            async def emit(frame: dict | None) -> None:
                # A gone client shows as a failed write or a hang-up, never as a read-side
                # EOF alone: a client may half-close after sending and still read the reply.
                if writer.is_closing() or (reader.at_eof() and peer_closed(writer.get_extra_info("socket"))):
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
                    # Half-closed: the client may still read, so it learns why nothing was imported.
                    with contextlib.suppress(ConnectionError):
                        await self._send(writer, responses.error(
                            rid, p.ErrorCode.BAD_REQUEST, "the upload ended before its last (empty) chunk; nothing was imported"))
                    raise ConnectionResetError("the client went away in the middle of an upload")
                return wire

            conn.busy = True
            try:
                reply = await self.daemon.handle(rid, req, emit, receive)
                await self._send(writer, reply)
            finally:
                conn.busy = False
            if req.op == "hello":
                if reply.get("type") == "error":
                    return
                if not conn.greeted:  # a second hello on one connection counts once
                    self.daemon.scheduler.clients += 1  # the scheduler's admission window reads it
                conn.greeted = True
