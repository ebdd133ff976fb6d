"""Framing over real socket pairs: partial and coalesced reads, limits, truncation, garbage."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.framing import (
    BadFrame,
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
    decode_body,
    encode_frame,
    read_frame,
    recv_frame,
    send_frame,
    write_frame,
)
from agentd.protocol import MAX_FRAME_BYTES

FRAMES = [
    {"id": 1, "op": "ping"},
    {"id": 2, "type": "token", "text": "héllo ✓"},
    {"id": None, "type": "error", "code": "BAD_FRAME", "message": ""},
    {"nested": {"list": [1, 2.5, None, True, b"\x00\xff"], "big": 2**64 - 1, "neg": -(2**63)}},
    {},
]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _header(n: int) -> bytes:
    return struct.pack(">I", n)


def test_round_trip_with_byte_by_byte_writes(pair):
    a, b = pair
    data = b"".join(encode_frame(f) for f in FRAMES)

    def trickle():
        for i in range(len(data)):
            a.send(data[i : i + 1])
            if i % 7 == 0:
                time.sleep(0.0005)
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=trickle)
    t.start()
    got = [recv_frame(b) for _ in FRAMES]
    assert recv_frame(b) is None  # clean EOF at a frame boundary
    t.join()
    assert got == FRAMES


def test_coalesced_frames_in_one_write(pair):
    a, b = pair
    a.sendall(b"".join(encode_frame(f) for f in FRAMES * 3))
    a.shutdown(socket.SHUT_WR)
    assert [recv_frame(b) for _ in range(len(FRAMES) * 3)] == FRAMES * 3
    assert recv_frame(b) is None


def test_send_frame(pair):
    a, b = pair
    send_frame(a, {"id": 1, "x": "y" * 100_000})  # larger than one socket buffer read
    assert recv_frame(b) == {"id": 1, "x": "y" * 100_000}


@pytest.mark.parametrize("length", [MAX_FRAME_BYTES + 1, 2**31, 2**32 - 1])
def test_oversized_header_rejected_before_the_body_is_read(pair, length):
    a, b = pair
    a.sendall(_header(length))  # no body follows and the socket stays open:
    b.settimeout(2)  # reading the body would block and time out instead of raising
    with pytest.raises(FrameTooLarge):
        recv_frame(b)


def test_limit_is_inclusive_and_configurable(pair):
    a, b = pair
    frame = encode_frame({"k": "v" * 50})
    body_len = len(frame) - 4
    a.sendall(frame + frame)
    assert recv_frame(b, max_bytes=body_len) == {"k": "v" * 50}
    with pytest.raises(FrameTooLarge):
        recv_frame(b, max_bytes=body_len - 1)


def test_encode_refuses_oversized_and_unencodable():
    with pytest.raises(FrameTooLarge):
        encode_frame({"b": b"x" * MAX_FRAME_BYTES})
    with pytest.raises(BadFrame):
        encode_frame({"obj": object()})
    with pytest.raises(BadFrame):
        encode_frame({"s": "\udc80"})


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",  # partial header
        b"\x00\x00\x00",
        _header(10) + b"\x81\xa1",  # partial body
        encode_frame({"a": 1})[:-1],
    ],
)
def test_truncated_frame_is_incomplete(pair, data):
    a, b = pair
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(IncompleteFrame):
        recv_frame(b)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used byte
        msgpack.packb([1, 2]),
        msgpack.packb("str"),
        msgpack.packb(None),
        msgpack.packb({1: "int key"}),
        msgpack.packb({"a": 1}) + b"\x00",  # extra data
        msgpack.packb({"t": msgpack.ExtType(5, b"abc")}),
        b"\x81\xa1a\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
        b"\x81\xa1a\xdf\xff\xff\xff\xff",  # map claiming 4 billion items
        b"\x81\xa1a\xdb\xff\xff\xff\xff",  # str claiming 4 GiB
        b"\x81\xa1a\xa2\xff\xfe",  # invalid UTF-8
        b"\x91" * 100_000,  # deep nesting
    ],
)
def test_bad_bodies_are_bad_frame(body):
    with pytest.raises(BadFrame):
        decode_body(body)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_property_garbage_body_is_a_map_or_bad_frame(body):
    try:
        obj = decode_body(body)
    except BadFrame:
        return
    assert isinstance(obj, dict)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_property_garbage_stream_only_raises_frame_errors(data):
    a, b = socket.socketpair()
    try:
        b.settimeout(5)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        for _ in range(len(data) + 1):
            try:
                if recv_frame(b, max_bytes=1024) is None:
                    break
            except FrameError:
                break  # a broken stream is abandoned after the first error
    finally:
        a.close()
        b.close()


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_like, max_size=5))
def test_property_encode_decode_round_trip(obj):
    frame = encode_frame(obj)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode_body(frame[4:]) == obj


# --- async ------------------------------------------------------------------------------


async def _stream_pair():
    """An asyncio reader/writer on one end of a socketpair, the raw socket on the other."""
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=b)
    return a, reader, writer


def test_async_read_partial_and_coalesced():
    async def main():
        raw, reader, writer = await _stream_pair()
        data = b"".join(encode_frame(f) for f in FRAMES)
        loop = asyncio.get_running_loop()

        def trickle():
            for i in range(0, len(data), 3):
                raw.sendall(data[i : i + 3])
                time.sleep(0.0005)
            raw.sendall(data)  # then everything again in one go
            raw.shutdown(socket.SHUT_WR)

        sender = loop.run_in_executor(None, trickle)
        got = [await read_frame(reader) for _ in range(len(FRAMES) * 2)]
        assert await read_frame(reader) is None
        await sender
        writer.close()
        raw.close()
        return got

    assert asyncio.run(main()) == FRAMES * 2


def test_async_write_frame_reaches_sync_reader():
    async def main():
        raw, reader, writer = await _stream_pair()
        raw.settimeout(5)
        for f in FRAMES:
            await write_frame(writer, f)
        writer.close()
        await writer.wait_closed()
        got = [recv_frame(raw) for _ in FRAMES]
        assert recv_frame(raw) is None
        raw.close()
        return got

    assert asyncio.run(main()) == FRAMES


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x00\x00", IncompleteFrame),
        (_header(10) + b"\x80", IncompleteFrame),
        (_header(2**32 - 1), FrameTooLarge),
        (_header(1) + b"\xc1", BadFrame),
        (_header(1) + b"\x90", BadFrame),
    ],
)
def test_async_errors(data, error):
    async def main():
        raw, reader, writer = await _stream_pair()
        raw.sendall(data)
        if error is not FrameTooLarge:  # the oversized header must fail without EOF
            raw.shutdown(socket.SHUT_WR)
        try:
            with pytest.raises(error):
                await asyncio.wait_for(read_frame(reader), 5)
        finally:
            writer.close()
            raw.close()

    asyncio.run(main())
