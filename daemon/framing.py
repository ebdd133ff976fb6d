"""Length-prefixed msgpack frames over a stream socket. Framing knows nothing of meaning.

A frame is a 4-byte big-endian unsigned body length followed by a msgpack body that must
decode to a map. The length is checked against the limit before any of the body is read,
so a hostile header cannot make us allocate or wait for 4 GiB.

Sync (`send_frame`, `recv_frame`) for the client, async (`write_frame`, `read_frame`)
for the daemon. Both return None on a clean EOF at a frame boundary and raise
IncompleteFrame on EOF inside a frame.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

import msgpack

from agentd.protocol import MAX_FRAME_BYTES

if TYPE_CHECKING:  # asyncio costs ~60 ms to import; the sync client never needs it
    import asyncio

HEADER = struct.Struct(">I")


class FrameError(Exception):
    """Base of all framing errors."""


class FrameTooLarge(FrameError):
    """The frame's declared (or encoded) length exceeds the limit."""


class BadFrame(FrameError):
    """The body is not valid msgpack, or does not decode to a map."""


class IncompleteFrame(FrameError):
    """The stream ended inside a frame."""


def encode_frame(obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Header plus msgpack body for `obj`. Raises FrameTooLarge, or BadFrame if unencodable."""
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # unencodable object, bad str
        raise BadFrame(f"cannot encode frame: {exc}") from exc
    if len(body) > max_bytes:
        raise FrameTooLarge(f"frame body is {len(body)} bytes; the limit is {max_bytes}")
    return HEADER.pack(len(body)) + body


def _check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise FrameTooLarge(f"frame header announces {length} bytes; the limit is {max_bytes}")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a map. Any malformed input raises BadFrame, nothing else."""
    n = len(body)
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            # unpackb has no max_buffer_size (only Unpacker does): the body is already
            # bounded by the header check. Every element takes at least one byte: no container can be longer than this.
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,  # no ext types (and no timestamps) in this protocol
        )
    except Exception as exc:  # msgpack raises many types for garbage; all mean one thing
        raise BadFrame(f"undecodable frame body: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"frame body is a {type(obj).__name__}, not a map")
    return obj


# --- sync -------------------------------------------------------------------------------


def send_frame(sock: socket.socket, obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> None:
    sock.sendall(encode_frame(obj, max_bytes))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; fewer only if the peer closed (the caller decides what that means)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return bytes(buf[:got])
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """Read one frame. None on EOF at a frame boundary; socket timeouts propagate."""
    header = _recv_exactly(sock, HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise IncompleteFrame(f"stream ended after {len(header)} of {HEADER.size} header bytes")
    (length,) = HEADER.unpack(header)
    _check_length(length, max_bytes)
    body = _recv_exactly(sock, length)
    if len(body) < length:
        raise IncompleteFrame(f"stream ended after {len(body)} of {length} body bytes")
    return decode_body(body)


# --- async ------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """Read one frame from an asyncio stream. None on EOF at a frame boundary."""
    import asyncio

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise IncompleteFrame(
            f"stream ended after {len(exc.partial)} of {HEADER.size} header bytes"
        ) from None
    (length,) = HEADER.unpack(header)
    _check_length(length, max_bytes)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise IncompleteFrame(f"stream ended after {len(exc.partial)} of {length} body bytes") from None
    return decode_body(body)


async def write_frame(writer: asyncio.StreamWriter, obj: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Write one frame and wait for the transport to drain (backpressure on token streams)."""
    writer.write(encode_frame(obj, max_bytes))
    await writer.drain()
