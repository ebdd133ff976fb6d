"""`Client`: a synchronous connection to agentd over its Unix socket.

The client connects lazily, says hello first, sends one request at a time and turns every
failure into a `ClientError`: `AgentdError` (the daemon, or local validation, refused the
request), `DaemonNotRunning` (no socket, or nobody listening), `ConnectionLost` (the
connection broke, timed out or the daemon sent something unreadable). No raw socket or
msgpack exception escapes.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from agentd import __version__
from agentd import protocol as p
from agentd import responses
from agentd.framing import FrameError, recv_frame, send_frame

DEFAULT_TIMEOUT = 120.0  # seconds to wait for each frame; a cold restore or long prefill is slow
START_HINT = "start it with `agentd` in a terminal, or `agentctl service install`"


class ClientError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class AgentdError(ClientError):
    """The daemon answered with an error (or the request failed local validation)."""

    def __init__(self, code: p.ErrorCode | str, message: str):
        super().__init__(message)
        try:
            self.code: p.ErrorCode | str = p.ErrorCode(code)
        except ValueError:  # a code from a newer daemon
            self.code = code

    def __str__(self) -> str:
        code = self.code.value if isinstance(self.code, p.ErrorCode) else self.code
        return f"{self.message} ({code})"


class DaemonNotRunning(ClientError):
    """Nothing is listening on the socket."""


class ConnectionLost(ClientError):
    """The connection failed mid-request, timed out, or carried an unreadable frame."""


def _build(cls: type[p.Request], *args: Any, **kwargs: Any) -> p.Request:
    try:
        return cls(*args, **kwargs)
    except p.ProtocolError as exc:
        raise AgentdError(exc.code, exc.message) from None


class ChatStream:
    """Iterate to receive generated text pieces; afterwards `.result` holds the final stats.

    Closing (or leaving the `with` block) before the end drops the connection, which the
    daemon takes as a cancellation.
    """

    def __init__(self, client: Client, request_id: int):
        self._client = client
        self._sock = client._sock  # the connection this stream lives on
        self._id = request_id
        self._done = False
        self._error: ClientError | None = None
        self.result: dict[str, Any] | None = None
        # Called with (done, total) as the daemon prefills the prompt; None ignores progress.
        self.on_progress: Callable[[int, int], None] | None = None
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """The text received so far (the full reply once the stream is done)."""
        return "".join(self._pieces)

    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if self._client._sock is not self._sock or self._sock is None:
            self._done = True
            raise ConnectionLost("the connection carrying this chat was closed")
        while True:
            try:
                frame = self._client._recv_response(self._id)
            except BaseException as exc:
                if isinstance(exc, ClientError):
                    self._error = exc
                # Ctrl-C or a broken connection mid-stream: unread frames may follow, so the
                # connection is unusable; dropping it also tells the daemon to cancel.
                self._finish()
                self._client.close()
                raise
            if not isinstance(frame, responses.Progress):
                break
            if self.on_progress is not None:
                self.on_progress(frame.done, frame.total)
        if isinstance(frame, responses.Token):
            self._pieces.append(frame.text)
            return frame.text
        self._finish()
        if isinstance(frame, responses.Error):
            self._error = AgentdError(frame.code, frame.message)
            raise self._error
        self.result = frame.fields
        raise StopIteration

    def wait(self) -> dict[str, Any]:
        """Consume the rest of the stream and return the final result (or raise its error)."""
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        if self.result is None:
            raise ConnectionLost("the chat stream ended without a result")
        return self.result

    def close(self) -> None:
        """Abandon an unfinished stream: the connection is dropped, the daemon cancels."""
        if not self._done:
            self._finish()
            self._client.close()

    def _finish(self) -> None:
        self._done = True
        if self._client._stream is self:
            self._client._stream = None

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to agentd. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        client_name: str = f"agentctl/{__version__}",
    ):
        if socket_path is None:
            from agentd.paths import default_socket  # platformdirs: only when needed

            socket_path = default_socket()
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.client_name = client_name
        self.daemon_info: dict[str, Any] | None = None  # the hello result
        self._sock: socket.socket | None = None
        self._next_id = 1
        self._stream: ChatStream | None = None

    # --- connection -----------------------------------------------------------------

    def connect(self) -> dict[str, Any]:
        """Connect and say hello, if not connected yet; returns the hello result."""
        if self._sock is None:
            self._sock = self._open()
            try:
                self.daemon_info = self._hello()
            except BaseException:
                self.close()
                raise
        assert self.daemon_info is not None
        return self.daemon_info

    def _open(self) -> socket.socket:
        path = str(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonNotRunning(f"agentd is not running (no daemon at {path}); {START_HINT}") from None
        except PermissionError:
            sock.close()
            raise ClientError(f"permission denied connecting to {path}: the socket belongs to another user") from None
        except (TimeoutError, socket.timeout):
            sock.close()
            raise ConnectionLost(f"timed out connecting to agentd at {path}") from None
        except OSError as exc:
            sock.close()
            raise ClientError(f"cannot connect to agentd at {path}: {exc.strerror or exc}") from None
        return sock

    def _hello(self) -> dict[str, Any]:
        try:
            info = self._call(p.Hello(protocol=p.PROTOCOL_VERSION, client=self.client_name))
        except AgentdError as exc:
            if exc.code == p.ErrorCode.PROTOCOL_MISMATCH:
                raise AgentdError(exc.code, self._mismatch_message(exc.message)) from None
            raise
        theirs = info.get("protocol")
        if theirs != p.PROTOCOL_VERSION:
            raise AgentdError(
                p.ErrorCode.PROTOCOL_MISMATCH,
                self._mismatch_message(f"the daemon speaks protocol {theirs!r}"),
            )
        return info

    def _mismatch_message(self, detail: str) -> str:
        return (
            f"agentctl speaks protocol {p.PROTOCOL_VERSION} but the daemon at {self.socket_path} "
            f"does not ({detail}); restart agentd from the same installation as agentctl"
        )

    def close(self) -> None:
        self._stream = None  # an unfinished stream notices its socket is gone
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self.daemon_info = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- request/response -----------------------------------------------------------

    def _send(self, request: p.Request) -> int:
        if self._stream is not None:
            raise ClientError("a chat stream is still in progress on this connection: finish or close it first")
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        rid = self._next_id
        self._next_id += 1
        self._send_frame(request, rid)
        return rid

    def _send_frame(self, request: p.Request, rid: int) -> None:
        assert self._sock is not None
        try:
            send_frame(self._sock, request.to_wire(rid))
        except FrameError as exc:
            raise AgentdError(p.ErrorCode.BAD_REQUEST, f"cannot send {request.op}: {exc}") from None
        except (TimeoutError, socket.timeout):
            self.close()
            raise ConnectionLost(f"timed out sending {request.op} to agentd") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"lost the connection to agentd while sending {request.op}: {exc}") from None

    def _recv_response(self, rid: int) -> responses.Response:
        """The next frame for request `rid`; any transport failure closes the connection."""
        if self._sock is None:
            raise ConnectionLost("the connection to agentd is closed")
        try:
            wire = recv_frame(self._sock)
            if wire is None:
                raise ConnectionLost("agentd closed the connection before answering (did it stop or crash?)")
            frame = responses.response_from_wire(wire)
            if frame.id != rid:
                # id None: the daemon could not read our request at all.
                if isinstance(frame, responses.Error) and frame.id is None:
                    raise AgentdError(frame.code, frame.message)
                raise ConnectionLost(f"agentd answered request {frame.id!r} while we waited for {rid}")
        except ClientError:
            self.close()
            raise
        except (TimeoutError, socket.timeout):
            self.close()
            raise ConnectionLost(
                f"agentd did not answer within {self.timeout:g} s (use a longer --timeout?)"
            ) from None
        except (FrameError, p.ProtocolError) as exc:
            self.close()
            raise ConnectionLost(f"unreadable reply from agentd: {exc}") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"lost the connection to agentd: {exc}") from None
        return frame

    def _call(self, request: p.Request) -> dict[str, Any]:
        """Send a request and return its result fields; non-streaming ops only."""
        rid = self._send(request)
        frame = self._recv_response(rid)
        if isinstance(frame, responses.Error):
            raise AgentdError(frame.code, frame.message)
        if isinstance(frame, (responses.Token, responses.Progress, responses.Chunk)):
            self.close()
            raise ConnectionLost(f"agentd streamed frames for a {request.op} request")
        return frame.fields

    def request(self, request: p.Request) -> dict[str, Any]:
        """Send any non-chat request object and return its result fields."""
        if isinstance(request, p.Chat):
            raise TypeError("use Client.chat() for chat requests: they stream")
        if isinstance(request, p.Hello):
            return self.connect()
        self.connect()
        return self._call(request)

    # --- ops ------------------------------------------------------------------------

    # Every method returns the op's result map exactly as documented in agentd.responses.

    def hello(self) -> dict[str, Any]:
        """{protocol, daemon_version, model_id, pid}."""
        return self.connect()

    def ping(self) -> dict[str, Any]:
        """{pong: True, pid}."""
        return self.request(p.Ping())

    def status(self) -> dict[str, Any]:
        return self.request(p.Status())

    def create(self, name: str, role: str = "", system: str = "") -> dict[str, Any]:
        """{agent: AgentInfo}."""
        return self.request(_build(p.Create, name, role=role, system=system))

    def fork(self, source: str, name: str) -> dict[str, Any]:
        """{agent: AgentInfo}: NAME gets SOURCE's role, system prompt and conversation."""
        return self.request(_build(p.Fork, name, source=source))

    def list(self) -> dict[str, Any]:
        """{agents: [AgentInfo]}."""
        return self.request(p.List())

    def show(self, name: str) -> dict[str, Any]:
        """{agent: AgentInfo, system: str}."""
        return self.request(_build(p.Show, name))

    def history(self, name: str) -> dict[str, Any]:
        """{messages: [{role, content}]}."""
        return self.request(_build(p.History, name))

    def delete(self, name: str) -> dict[str, Any]:
        """{deleted: name}."""
        return self.request(_build(p.Delete, name))

    def reset(self, name: str) -> dict[str, Any]:
        """{agent: AgentInfo}: the conversation is forgotten."""
        return self.request(_build(p.Reset, name))

    def chat(
        self,
        name: str,
        message: str,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        top_p: float = 1.0,
        stop: list[str] | tuple[str, ...] = (),
        rebuild: bool = False,
    ) -> ChatStream:
        """Send a message; iterate the returned stream for text, then read `.result`.

        `on_progress(done, total)` is called as the daemon prefills the prompt. `stop`
        ends the reply before the first occurrence of any of its strings. `rebuild` makes the
        daemon recompute the cache from the transcript instead of using a stored or hot one.
        """
        request = _build(p.Chat, name, message, max_tokens=max_tokens, temperature=temperature, seed=seed,
                         top_p=top_p, stop=list(stop), rebuild=rebuild)
        self.connect()
        rid = self._send(request)
        self._stream = ChatStream(self, rid)
        self._stream.on_progress = on_progress
        return self._stream

    def save(self, name: str | None = None) -> dict[str, Any]:
        """{saved: [name]}: one agent, or every dirty agent when name is None."""
        return self.request(_build(p.Save, name))

    def evict(self, name: str) -> dict[str, Any]:
        """{evicted: name, was_dirty: bool}: saved first if dirty, then dropped from memory."""
        return self.request(_build(p.Evict, name))

    def gc(self) -> dict[str, Any]:
        """{removed_blocks, freed_bytes, store}: delete stored KV blocks no agent names."""
        return self.request(p.Gc())

    def export(self, name: str, sink: Callable[[bytes], None]) -> dict[str, Any]:
        """Stream agent NAME's bundle to `sink`, piece by piece, and return the result
        {name, bytes, sha256, messages, cache_tokens, cache_reason}. The bytes `sink` got
        are checked against the result's size and SHA-256 before this returns."""
        request = _build(p.Export, name)
        self.connect()
        rid = self._send(request)
        digest, size = hashlib.sha256(), 0
        try:
            while True:
                frame = self._recv_response(rid)
                if isinstance(frame, responses.Chunk):
                    digest.update(frame.data)
                    size += len(frame.data)
                    sink(frame.data)
                    continue
                if isinstance(frame, responses.Error):
                    raise AgentdError(frame.code, frame.message)
                if isinstance(frame, responses.Result):
                    break
                raise ConnectionLost(f"agentd sent a {type(frame).__name__.lower()} frame during an export")
        except BaseException:
            self.close()  # unread chunks may follow: the connection is out of step
            raise
        result = frame.fields
        if result.get("bytes") != size or result.get("sha256") != digest.hexdigest():
            raise ConnectionLost(f"the export arrived damaged ({size} bytes received, {result.get('bytes')} sent)")
        return result

    def import_(self, chunks: Iterable[bytes], name: str | None = None) -> dict[str, Any]:
        """Upload a bundle (an iterable of byte strings, e.g. a file read in pieces) and
        return {agent, bytes, sha256, cache_imported, cache_tokens, cache_reason}. NAME
        (default: the bundle's own) must not be taken."""
        request = _build(p.Import, name)
        self.connect()
        rid = self._send(request)
        try:
            for data in chunks:
                for lo in range(0, len(data), p.MAX_CHUNK_BYTES):
                    self._send_frame(p.Chunk(bytes(data[lo:lo + p.MAX_CHUNK_BYTES])), rid)
            self._send_frame(p.Chunk(b""), rid)
        except BaseException:
            self.close()  # the daemon sees the upload break off and forgets it
            raise
        frame = self._recv_response(rid)
        if isinstance(frame, responses.Error):
            raise AgentdError(frame.code, frame.message)
        if not isinstance(frame, responses.Result):
            self.close()
            raise ConnectionLost(f"agentd sent a {type(frame).__name__.lower()} frame during an import")
        return frame.fields

    def shutdown(self) -> dict[str, Any]:
        """{stopping: True}: the daemon flushes and exits; this connection is closed."""
        try:
            return self.request(p.Shutdown())
        finally:
            self.close()
