"""The protocol module: every request round-trips, bad input is rejected with the right code."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd import protocol as p
from agentd import responses
from agentd.protocol import ErrorCode, ProtocolError

EXAMPLES: list[p.Request] = [
    p.Hello(protocol=p.PROTOCOL_VERSION, client="test/1"),
    p.Ping(),
    p.Status(),
    p.Create("alice", role="reviewer", system="You review code."),
    p.Create("a"),
    p.Fork("alice-2", source="alice"),
    p.List(),
    p.Show("alice"),
    p.History("alice"),
    p.Delete("alice"),
    p.Reset("alice"),
    p.Chat("alice", "hello", max_tokens=8192, temperature=5.0, seed=2**63 - 1),
    p.Chat("alice", "hello"),
    p.Save(),
    p.Save("alice"),
    p.Evict("alice"),
    p.Gc(),
    p.Export("alice"),
    p.Import(),
    p.Import("alice-2"),
    p.Chunk(b"\x89agentd\n"),
    p.Chunk(b""),
    p.Shutdown(),
    p.Turn(name="alice", messages=[{"role": "user", "content": "hi"}]),
    p.Turn(name="alice", follow=True, system="S", top_p=0.5, tools=[{"type": "function", "function": {"name": "f"}}],
           response={"id": "resp_1", "meta": {"model": "agent:alice"}},
           messages=[{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "content": "42", "tool_call_id": "c"}]),
    p.Complete(messages=[{"role": "user", "content": "hi"}], system="S", stop=["\n\n", "END"]),
    p.GetResponse("resp_1"),
]


def test_every_op_has_an_example():
    assert {r.op for r in EXAMPLES} == set(p.REQUEST_TYPES)


@pytest.mark.parametrize("request_", EXAMPLES, ids=lambda r: r.op)
def test_round_trip_through_msgpack(request_):
    wire = request_.to_wire(7)
    assert wire["id"] == 7 and wire["op"] == request_.op
    decoded = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)
    assert p.request_from_wire(decoded) == (7, request_)


def test_defaults_fill_in_when_fields_are_omitted():
    assert p.request_from_wire({"id": 1, "op": "chat", "name": "a", "message": "m"}) == (
        1,
        p.Chat("a", "m", max_tokens=256, temperature=0.0, seed=None),
    )
    assert p.request_from_wire({"id": 2, "op": "save"}) == (2, p.Save(None))
    assert p.request_from_wire({"id": 3, "op": "create", "name": "x"}) == (3, p.Create("x", "", ""))


def test_temperature_int_is_normalised_to_float():
    _, req = p.request_from_wire({"id": 1, "op": "chat", "name": "a", "message": "m", "temperature": 1})
    assert req.temperature == 1.0 and isinstance(req.temperature, float)


@pytest.mark.parametrize(
    "name",
    ["../x", "", "a" * 65, "a\x00b", ".hidden", ".", "..", "a/b", "a b", "é", "a\\b", "a\n", 5, None, b"abc", ["a"],
     "-dash", "--help", ".tmp-0123-a"],
)
def test_bad_names_are_invalid_name(name):
    with pytest.raises(ProtocolError) as info:
        p.validate_agent_name(name)
    assert info.value.code is ErrorCode.INVALID_NAME
    assert info.value.message
    # The same check applies to every named request, built locally or read from the wire.
    with pytest.raises(ProtocolError) as info:
        p.request_from_wire({"id": 4, "op": "show", "name": name})
    assert info.value.code is ErrorCode.INVALID_NAME
    assert info.value.request_id == 4


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "x" * 64, "0", "agent.v2", "a..b", "a-", "_u", "x.partial"])
def test_good_names(name):
    assert p.validate_agent_name(name) == name
    assert p.Save(name).name == name


def _chat(**fields):
    return {"id": 9, "op": "chat", "name": "a", "message": "hi", **fields}


@pytest.mark.parametrize(
    "wire",
    [
        _chat(max_tokens=0),
        _chat(max_tokens=8193),
        _chat(max_tokens="5"),
        _chat(max_tokens=True),
        _chat(max_tokens=1.0),
        _chat(temperature=-0.1),
        _chat(temperature=5.01),
        _chat(temperature=float("nan")),
        _chat(temperature=float("inf")),
        _chat(temperature="0"),
        _chat(temperature=False),
        _chat(seed=-1),
        _chat(seed=2**63),
        _chat(seed="1"),
        _chat(seed=1.5),
        _chat(message=""),
        _chat(message=None),
        _chat(message=b"bytes"),
        _chat(message="x" * (p.MAX_TEXT_BYTES + 1)),
        _chat(message="é" * (p.MAX_TEXT_BYTES // 2 + 1)),  # chars within, UTF-8 bytes over
        _chat(extra=1),
        {"id": 9, "op": "chat", "name": "a"},  # message missing
        {"id": 9, "op": "show"},  # name missing
        {"id": 9, "op": "create", "name": "a", "role": "r" * 201},
        {"id": 9, "op": "create", "name": "a", "role": None},
        {"id": 9, "op": "create", "name": "a", "system": "s" * (p.MAX_TEXT_BYTES + 1)},
        {"id": 9, "op": "hello", "protocol": "1"},
        {"id": 9, "op": "hello", "protocol": True},
        {"id": 9, "op": "hello"},
        {"id": 9, "op": "ping", "name": "a"},
        {"id": 9, "op": "turn", "messages": [{"role": "user", "content": "x"}]},  # name missing
        {"id": 9, "op": "turn", "name": "a", "messages": []},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "system", "content": "x"}]},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": "x", "extra": 1}]},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": None}]},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": "x"}], "system": "s"},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
        {"id": 9, "op": "turn", "name": "a", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        {"id": 9, "op": "complete", "messages": [{"role": "user", "content": "x" * (p.MAX_TEXT_BYTES + 1)}]},
        {"id": 9, "op": None},
        {"id": 9},
    ],
)
def test_bad_fields_are_bad_request_and_keep_the_id(wire):
    with pytest.raises(ProtocolError) as info:
        p.request_from_wire(wire)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id == 9


def test_limits_are_inclusive():
    p.Chat("a", "x" * p.MAX_TEXT_BYTES)
    p.Create("a", role="r" * 200, system="s" * p.MAX_TEXT_BYTES)


@pytest.mark.parametrize("wire", [{"op": "ping"}, {"id": "1", "op": "ping"}, {"id": -1, "op": "ping"},
                                  {"id": True, "op": "ping"}, {"id": None, "op": "ping"}, {"id": 2**63, "op": "ping"},
                                  [1, 2], "ping", None])
def test_unreadable_id_is_bad_request_without_id(wire):
    with pytest.raises(ProtocolError) as info:
        p.request_from_wire(wire)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id is None
    assert p.peek_request_id(wire) is None


def test_unknown_op():
    with pytest.raises(ProtocolError) as info:
        p.request_from_wire({"id": 3, "op": "format_disk"})
    assert info.value.code is ErrorCode.UNKNOWN_OP
    assert info.value.request_id == 3


def test_direct_construction_validates_too():
    with pytest.raises(ProtocolError) as info:
        p.Chat("ok", "m", max_tokens=10**6)
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as info:
        p.Evict("../etc")
    assert info.value.code is ErrorCode.INVALID_NAME
    with pytest.raises(ProtocolError):
        p.Chat("ok", "lone surrogate \udc80")


def test_requests_are_frozen():
    req = p.Show("a")
    with pytest.raises(AttributeError):
        req.name = "b"  # type: ignore[misc]


# --- responses ------------------------------------------------------------------------


def test_response_helpers_shape():
    assert responses.result(1, pong=True, pid=5) == {"id": 1, "type": "result", "pong": True, "pid": 5}
    assert responses.token(2, "he") == {"id": 2, "type": "token", "text": "he"}
    assert responses.error(3, ErrorCode.NOT_FOUND, "no agent 'x'") == {
        "id": 3,
        "type": "error",
        "code": "NOT_FOUND",
        "message": "no agent 'x'",
    }
    assert responses.error(None, "BAD_FRAME", "garbage")["id"] is None
    with pytest.raises(ValueError):
        responses.error(1, "NOT_A_CODE", "x")
    with pytest.raises(ValueError):
        responses.result(1, type="token")


def test_response_from_wire():
    assert responses.response_from_wire(responses.result(1, saved=["a"])) == responses.Result(1, {"saved": ["a"]})
    assert responses.response_from_wire(responses.token(1, "x")) == responses.Token(1, "x")
    assert responses.response_from_wire(responses.error(None, ErrorCode.BUSY, "busy")) == responses.Error(None, "BUSY", "busy")
    # A code this client does not know (a newer daemon) still parses.
    assert responses.response_from_wire({"id": 1, "type": "error", "code": "NEW", "message": "m"}).code == "NEW"


@pytest.mark.parametrize(
    "wire",
    [
        [],
        {"id": 1},
        {"id": 1, "type": "bogus"},
        {"id": "1", "type": "result"},
        {"id": True, "type": "result"},
        {"id": 1, "type": "token"},
        {"id": 1, "type": "token", "text": 5},
        {"id": 1, "type": "error", "code": "X"},
    ],
)
def test_bad_responses_are_bad_frame(wire):
    with pytest.raises(ProtocolError) as info:
        responses.response_from_wire(wire)
    assert info.value.code is ErrorCode.BAD_FRAME


def test_error_codes_are_their_names():
    assert {c.name for c in ErrorCode} == {
        "BAD_FRAME", "BAD_REQUEST", "UNKNOWN_OP", "PROTOCOL_MISMATCH", "INVALID_NAME", "NOT_FOUND",
        "ALREADY_EXISTS", "BUSY", "CANCELLED", "SHUTTING_DOWN", "INTERNAL", "MODEL_ERROR", "BAD_BUNDLE",
        "PERMISSION_DENIED", "CONTEXT_TOO_LONG",
    }  # fmt: skip
    assert all(c.value == c.name for c in ErrorCode)


# --- property-based -------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)

requests = st.one_of(
    st.builds(p.Hello, protocol=st.integers(0, 2**31 - 1), client=texts),
    st.just(p.Ping()),
    st.just(p.Status()),
    st.builds(p.Create, names, role=texts, system=texts),
    st.just(p.List()),
    *(st.builds(cls, names) for cls in (p.Show, p.History, p.Delete, p.Reset, p.Evict)),
    st.builds(
        p.Chat,
        names,
        texts.filter(bool),
        max_tokens=st.integers(1, 8192),
        temperature=st.floats(0, 5, allow_nan=False),
        seed=st.none() | st.integers(0, 2**63 - 1),
    ),
    st.builds(p.Save, st.none() | names),
    st.just(p.Shutdown()),
)


@given(requests, st.integers(0, 2**63 - 1))
def test_property_round_trip(request_, rid):
    body = msgpack.packb(request_.to_wire(rid), use_bin_type=True)
    assert p.request_from_wire(msgpack.unpackb(body, raw=False)) == (rid, request_)


@given(st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.floats() | texts | st.booleans(),
                       max_size=6))
def test_property_arbitrary_maps_only_raise_protocol_error(wire):
    wire.setdefault("op", "chat")
    try:
        p.request_from_wire(wire)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP, ErrorCode.INVALID_NAME)


@given(st.text(max_size=80))
def test_property_name_validation_matches_the_rule(name):
    ok = (
        0 < len(name) <= 64
        and not name.startswith((".", "-"))
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    )
    try:
        p.validate_agent_name(name)
    except ProtocolError as exc:
        assert not ok and exc.code is ErrorCode.INVALID_NAME
    else:
        assert ok


def test_chunks_are_bytes_within_the_limit():
    assert p.Chunk(b"x" * p.MAX_CHUNK_BYTES).data
    for data in ("text", b"x" * (p.MAX_CHUNK_BYTES + 1), None):
        with pytest.raises(ProtocolError) as info:
            p.request_from_wire({"id": 1, "op": "chunk", "data": data})
        assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as info:
        p.request_from_wire({"id": 1, "op": "import", "name": "../x"})
    assert info.value.code is ErrorCode.INVALID_NAME


def test_chunk_frames_parse_and_bad_ones_are_bad_frames():
    wire = msgpack.unpackb(msgpack.packb(responses.chunk(3, memoryview(b"abc")), use_bin_type=True), raw=False)
    assert responses.response_from_wire(wire) == responses.Chunk(3, b"abc")
    with pytest.raises(ProtocolError) as info:
        responses.response_from_wire({"id": 3, "type": "chunk", "data": "abc"})
    assert info.value.code is ErrorCode.BAD_FRAME
