"""The agentd wire protocol: every message the daemon and its clients exchange.

This module is the single definition of message shapes; the daemon, `agentctl` and any
other local program import it. It imports neither mlx nor anything heavy.

Transport (see `agentd.framing`): each frame is a 4-byte big-endian unsigned length, then
a msgpack map of at most MAX_FRAME_BYTES. A connection carries one request at a time.

Requests (client -> daemon) are maps `{"id": <int>, "op": "<op>", ...fields}`; the client
sends `hello` first on every connection. Ops and fields (defaults in brackets):

    hello     protocol: int, client: str [""]
    ping      -
    status    -
    create    name, role: str [""] (<= 200 chars), system: str [""] (<= 1 MiB UTF-8)
    fork      name, source   (a new agent with source's role, system prompt and messages;
                              it starts from source's stored cache blocks)
    list      -
    show      name
    history   name
    delete    name
    reset     name
    chat      name, message: str (1 char .. 1 MiB UTF-8), max_tokens: int [256] (1..8192),
              temperature: float [0.0] (0..5), seed: int | None [None] (0..2**63-1),
              top_p: float [1.0] (0 < top_p <= 1), stop: [str] [[]] (<= 4, 1..256 chars each)
              (these five are `Sampling`; a seeded turn draws from its own random key,
              so it replies the same whatever other agents run beside it)
              rebuild: bool [False] (recompute the cache from the transcript: nothing
              from memory or the stored blocks; the result says "rebuilt")
    save      name: str | None [None]  (None: every dirty agent)
    evict     name
    export    name   (answered by `chunk` frames carrying the bundle's bytes, then a result;
                      see `agentd.bundle` for the file format)
    import    name: str | None [None]  (None: the bundle's own name). An upload: after the
              request the client sends the bundle as `chunk` requests with the import's
              id, then one chunk with empty data; only then does the daemon answer (a
              refusal found early is reported after the upload has been read)
    chunk     data: bytes (<= MAX_CHUNK_BYTES), only as part of an import upload
    shutdown  -
    turn      name, messages: [Message] (1..), follow: bool [False], system: str | None [None],
              tools: [Tool] | None [None], response: ResponseRef | None [None],
              max_tokens, temperature, seed, top_p, stop (as chat)
              (one turn of several new messages; with follow the messages are the whole
               conversation after the system prompt and the agent follows it, keeping a
               replaced transcript as a branch: see `agentd.transcripts`)
    complete  messages: [Message] (1..), system: str [""], tools, response, sampling as turn
              (a stateless completion with the base model; no agent is read or written)
    response  response_id: str   (a Responses API object stored by turn or complete)

    Message   {role: "user"|"assistant"|"tool", content: str, tool_calls: [ToolCall]?,
               tool_call_id: str?, name: str?}; ToolCall {id, type: "function",
               function: {name, arguments: str}}. At most MAX_TURN_BYTES of text in all.
    Tool      {type: "function", function: {name, description?, parameters?}} (as OpenAI's;
              handed to the model's chat template)
    ResponseRef {id: str (<= 100 chars), meta: map}: store the turn's result as a Responses
              API object under `id`, with `meta` (how the front end built the request)

An agent name is 1..64 of letters, digits, "-", "_", "." and does not start with "." (no
hidden files, and none of agentd's temp files) nor "-" (it would read as an option to
`agentctl`).

Responses (daemon -> client) and the result fields of each op: `agentd.responses`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from .checks import (  # noqa: F401  (re-exported: the protocol's public names)
    MAX_NAME_CHARS,
    MAX_RESPONSE_ID_CHARS,
    MAX_TEXT_BYTES,
    MAX_TURN_BYTES,
    MAX_TURN_MESSAGES,
    MESSAGE_ROLES,
    ErrorCode,
    ProtocolError,
    check_messages,
    validate_agent_name,
)
from .checks import bad as _bad
from .checks import check_float as _check_float
from .checks import check_int as _check_int
from .checks import check_response_ref as _check_response_ref
from .checks import check_str as _check_str
from .checks import check_tools as _check_tools

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024

MAX_ROLE_CHARS = 200
MAX_CLIENT_CHARS = 200
MAX_TOKENS_LIMIT = 8192
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**63 - 1
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # bundle bytes per chunk frame, either way


# --- requests -------------------------------------------------------------------------


MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Sampling:
    """How a turn's reply is drawn: defined once here, carried whole from the request to the
    sampler. temperature 0 is greedy (top_p and seed then do nothing); `stop` ends the reply
    at the first occurrence of any of its strings, which is left out of the reply."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        object.__setattr__(self, "temperature", _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        object.__setattr__(self, "top_p", _check_float("top_p", self.top_p, 0.0, 1.0))
        if self.top_p == 0.0:
            raise _bad("top_p must be greater than 0")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, (list, tuple)):
            raise _bad(f"stop must be a list of strings, not {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _bad(f"stop has {len(self.stop)} strings; the limit is {MAX_STOP_STRINGS}")
        for s in self.stop:
            _check_str("stop", s, max_chars=MAX_STOP_CHARS)
            if not s:
                raise _bad("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))



@dataclass(frozen=True)
class Request:
    """Base of every request. Subclasses set `op` and validate in `_validate`."""

    op: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        pass

    def _set(self, field: str, value: Any) -> None:
        # Frozen dataclass: normalise (e.g. int -> float) during validation only.
        object.__setattr__(self, field, value)

    def to_wire(self, request_id: int) -> dict[str, Any]:
        """The msgpack-ready map for this request with id `request_id`."""
        wire: dict[str, Any] = {"id": request_id, "op": self.op}
        for f in fields(self):
            wire[f.name] = getattr(self, f.name)
        return wire


@dataclass(frozen=True)
class _Named(Request):
    name: str

    def _validate(self) -> None:
        validate_agent_name(self.name)


@dataclass(frozen=True)
class Hello(Request):
    op: ClassVar[str] = "hello"
    protocol: int
    client: str = ""

    def _validate(self) -> None:
        _check_int("protocol", self.protocol, 0, 2**31 - 1)
        _check_str("client", self.client, max_chars=MAX_CLIENT_CHARS)


@dataclass(frozen=True)
class Ping(Request):
    op: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Status(Request):
    op: ClassVar[str] = "status"


@dataclass(frozen=True)
class Create(_Named):
    op: ClassVar[str] = "create"
    role: str = ""
    system: str = ""

    def _validate(self) -> None:
        super()._validate()
        _check_str("role", self.role, max_chars=MAX_ROLE_CHARS)
        _check_str("system", self.system, max_bytes=MAX_TEXT_BYTES)


@dataclass(frozen=True)
class Fork(_Named):
    """A new agent `name` with `source`'s role, system prompt and conversation (not its cache)."""

    op: ClassVar[str] = "fork"
    source: str

    def _validate(self) -> None:
        super()._validate()
        validate_agent_name(self.source)


@dataclass(frozen=True)
class List(Request):
    op: ClassVar[str] = "list"


@dataclass(frozen=True)
class Show(_Named):
    op: ClassVar[str] = "show"


@dataclass(frozen=True)
class History(_Named):
    op: ClassVar[str] = "history"


@dataclass(frozen=True)
class Delete(_Named):
    op: ClassVar[str] = "delete"


@dataclass(frozen=True)
class Reset(_Named):
    op: ClassVar[str] = "reset"


@dataclass(frozen=True)
class Chat(_Named):
    op: ClassVar[str] = "chat"
    message: str
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    stop: list[str] | tuple[str, ...] = ()
    # Recompute the cache from the transcript, ignoring the one in memory and the stored
    # blocks: for comparing against a full re-read, or for distrusting a cache.
    rebuild: bool = False

    def _validate(self) -> None:
        super()._validate()
        if not isinstance(self.rebuild, bool):
            raise _bad(f"rebuild must be true or false, not {type(self.rebuild).__name__}")
        _check_str("message", self.message, max_bytes=MAX_TEXT_BYTES)
        if not self.message:
            raise _bad("message must not be empty")
        sampling = self.sampling  # validates every sampling field
        self._set("temperature", sampling.temperature)
        self._set("top_p", sampling.top_p)
        self._set("stop", list(sampling.stop))

    @property
    def sampling(self) -> Sampling:
        # A stop that is not a list reaches Sampling as it is, which names the bad type.
        return Sampling(self.max_tokens, self.temperature, self.top_p, self.seed,
                        tuple(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop)

    def to_wire(self, request_id: int) -> dict[str, Any]:
        # top_p and stop came later: left out at their defaults, so a daemon from before
        # them still accepts what this client sends.
        wire = super().to_wire(request_id)
        if wire["top_p"] == 1.0:
            del wire["top_p"]
        if not wire["stop"]:
            del wire["stop"]
        if not wire["rebuild"]:
            del wire["rebuild"]
        return wire

    @property
    def new_messages(self) -> list[dict]:
        """What this turn appends to the conversation before the reply."""
        return [{"role": "user", "content": self.message}]


@dataclass(frozen=True)
class Save(Request):
    op: ClassVar[str] = "save"
    name: str | None = None

    def _validate(self) -> None:
        if self.name is not None:
            validate_agent_name(self.name)


@dataclass(frozen=True)
class Evict(_Named):
    op: ClassVar[str] = "evict"


@dataclass(frozen=True)
class Gc(Request):
    op: ClassVar[str] = "gc"


@dataclass(frozen=True)
class Export(_Named):
    op: ClassVar[str] = "export"


@dataclass(frozen=True)
class Import(Request):
    op: ClassVar[str] = "import"
    name: str | None = None

    def _validate(self) -> None:
        if self.name is not None:
            validate_agent_name(self.name)


@dataclass(frozen=True)
class Chunk(Request):
    """A piece of an upload (import); empty `data` ends it."""

    op: ClassVar[str] = "chunk"
    data: bytes

    def _validate(self) -> None:
        if not isinstance(self.data, bytes):
            raise _bad(f"data must be bytes, not {type(self.data).__name__}")
        if len(self.data) > MAX_CHUNK_BYTES:
            raise _bad(f"a chunk is {len(self.data)} bytes; the limit is {MAX_CHUNK_BYTES}")


@dataclass(frozen=True)
class Shutdown(Request):
    op: ClassVar[str] = "shutdown"


@dataclass(frozen=True, kw_only=True)
class _TurnBase(Request):
    """Fields shared by turn and complete: the messages, tools and how to sample."""

    messages: list
    tools: list | None = None
    response: dict | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = ()

    def _validate(self) -> None:
        check_messages(self.messages)
        if self.tools is not None:
            _check_tools(self.tools)
        if self.response is not None:
            _check_response_ref(self.response)
        sampling = self.sampling  # validates every sampling field
        self._set("temperature", sampling.temperature)
        self._set("top_p", sampling.top_p)
        self._set("stop", list(sampling.stop))

    @property
    def sampling(self) -> Sampling:
        # A stop that is not a list reaches Sampling as it is, which names the bad type.
        return Sampling(self.max_tokens, self.temperature, self.top_p, self.seed,
                        tuple(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop)


@dataclass(frozen=True, kw_only=True)
class Turn(_TurnBase):
    """One turn of an agent made of several new messages (or, with `follow`, the whole
    conversation the agent is to follow). `system` replaces the system prompt (follow only)."""

    op: ClassVar[str] = "turn"
    name: str
    follow: bool = False
    system: str | None = None

    def _validate(self) -> None:
        validate_agent_name(self.name)
        super()._validate()
        if not isinstance(self.follow, bool):
            raise _bad("follow must be true or false")
        if self.system is not None:
            _check_str("system", self.system, max_bytes=MAX_TEXT_BYTES)
            if not self.follow:
                raise _bad("system may only be given with follow (a turn that replaces the conversation)")


@dataclass(frozen=True, kw_only=True)
class Complete(_TurnBase):
    """A stateless completion of `messages` after `system` with the base model."""

    op: ClassVar[str] = "complete"
    system: str = ""

    def _validate(self) -> None:
        super()._validate()
        _check_str("system", self.system, max_bytes=MAX_TEXT_BYTES)


@dataclass(frozen=True)
class GetResponse(Request):
    op: ClassVar[str] = "response"
    response_id: str

    def _validate(self) -> None:
        _check_str("response_id", self.response_id, max_chars=MAX_RESPONSE_ID_CHARS)


REQUEST_TYPES: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (Hello, Ping, Status, Create, Fork, List, Show, History, Delete, Reset, Chat, Save, Evict, Gc, Shutdown,
                Turn, Complete, GetResponse, Export, Import, Chunk)
}

_MAX_ID = 2**63 - 1


def peek_request_id(wire: Any) -> int | None:
    """The request id of a decoded frame if it has a valid one, else None."""
    if isinstance(wire, dict):
        rid = wire.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_ID:
            return rid
    return None


def request_from_wire(wire: Any) -> tuple[int, Request]:
    """Parse and validate a decoded request frame into `(id, request)`.

    Raises ProtocolError (BAD_REQUEST, UNKNOWN_OP or INVALID_NAME) whose `request_id`
    is the frame's id when that was readable, so the daemon can answer it.
    """
    if not isinstance(wire, dict):
        raise _bad(f"a request must be a map, not {type(wire).__name__}")
    if "id" not in wire:
        raise _bad("request has no 'id'")
    rid = peek_request_id(wire)
    if rid is None:
        raise _bad(f"request id must be an integer between 0 and {_MAX_ID}")
    try:
        op = wire.get("op")
        if not isinstance(op, str):
            raise _bad("request has no 'op' string")
        cls = REQUEST_TYPES.get(op)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")
        known = {f.name for f in fields(cls)}
        extra = [k for k in wire if k not in known and k not in ("id", "op")]
        if extra:
            raise _bad(f"unknown field(s) for {op}: {', '.join(sorted(map(repr, extra)))}")
        missing = [
            f.name
            for f in fields(cls)
            if f.name not in wire and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise _bad(f"{op} is missing field(s): {', '.join(missing)}")
        request = cls(**{k: v for k, v in wire.items() if k in known})
    except ProtocolError as exc:
        exc.request_id = rid
        raise
    return rid, request
