"""The durable record of every agent: name, role, system prompt and conversation (SQLite, WAL).

This is the source of truth for what users said; KV cache files are derived from it and
may lag behind. A turn is committed (synchronous=FULL) before its reply is acknowledged.
Each thread gets its own connection, so readers never wait on the MLX worker.

A message is `{"role", "content"}` plus, where present, the tool-call fields `tool_calls`,
`tool_call_id` and `name` (kept as JSON in the `extra` column, schema 2). Schema 2 also
adds `responses`: what the HTTP front end's Responses API needs to answer
`GET /v1/responses/{id}` and `previous_response_id` after a restart.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("agentd.records")

SCHEMA_VERSION = 2

# Message keys besides role and content that are kept (in `extra`), in this order.
EXTRA_KEYS = ("tool_calls", "tool_call_id", "name")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    system TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_used_at REAL NOT NULL
);
-- Names are case-sensitive, but two that differ only in case would share one cache file
-- on a case-insensitive filesystem (macOS by default): refuse the second.
CREATE UNIQUE INDEX IF NOT EXISTS agents_name_nocase ON agents (name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS messages (
    agent TEXT NOT NULL REFERENCES agents(name) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (agent, seq)
);
"""

# Each step takes a database of version N-1 to N, inside the opening transaction.
_MIGRATIONS = {
    2: """
ALTER TABLE messages ADD COLUMN extra TEXT;
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    agent TEXT,
    created_at REAL NOT NULL,
    n_messages INTEGER NOT NULL,
    body TEXT NOT NULL
);
""",
}


class RecordError(Exception):
    pass


class RecordsReplaced(RecordError):
    """agents.db was deleted or replaced while the daemon had it open: what would be written
    now would go into a file the next start cannot find, so nothing more is."""


class AlreadyExists(RecordError):
    pass


class NotFound(RecordError):
    pass


@dataclass
class AgentRecord:
    name: str
    role: str
    system: str
    created_at: float
    updated_at: float
    last_used_at: float
    n_messages: int = 0
    messages: list[dict] = field(default_factory=list)


REPLACED_MESSAGE = (
    "{path} was deleted or replaced while agentd was running, so nothing more can be recorded "
    "(and this change was not); restart agentd: it recovers every agent from its cache file, which "
    "the final flush at stop brings up to date for the agents in memory"
)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Records:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self.replaced = False  # set once the file at `path` is no longer the one open
        self._set_aside_orphaned_wal()
        # WAL is a property of the file, set once here; per-connection it would need a lock
        # that another process holding the database would make every new reader wait for.
        self._db().execute("PRAGMA journal_mode=WAL")
        self._db().executescript(_SCHEMA)
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            # A database without a version was just created from schema 1 above.
            version = 1 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise RecordError(f"{self.path} has schema {version}, newer than this agentd ({SCHEMA_VERSION})")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _set_aside_orphaned_wal(self) -> None:
        """A -wal or -shm without its database belongs to a deleted one (SQLite never removes
        the database itself): replayed into a new database it would corrupt it."""
        if self.path.exists():
            return
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                aside = side.with_name(f"{side.name}.orphaned-{int(time.time() * 1000)}")
                os.replace(side, aside)
                log.warning("%s has no database beside it; moved it aside to %s", side.name, aside.name)

    def _check_still_ours(self) -> None:
        """Before and after every write: the file at our path must be the one this thread's
        connection has open, or the write would be acknowledged yet lost at the next start."""
        if _identity(self.path) == self._local.identity:
            return
        message = REPLACED_MESSAGE.format(path=self.path)
        if not self.replaced:
            self.replaced = True
            log.error("%s", message)
        raise RecordsReplaced(message)

    def _read(self) -> "_Tx":
        """A read transaction: deferred, so it takes no write lock and, in WAL mode, never
        waits for a writer (another process holding BEGIN IMMEDIATE included)."""
        return _Tx(self._db(), "BEGIN")

    def _write(self) -> "_Tx":
        """A write transaction: the write lock from the start, so it cannot deadlock halfway."""
        return _Tx(self._db(), "BEGIN IMMEDIATE", check=self._check_still_ours)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._local.db = db
            self._local.identity = _identity(self.path)
        return db

    def create(self, name: str, role: str, system: str) -> AgentRecord:
        now = time.time()
        try:
            with self._write() as db:
                db.execute("INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?)", (name, role, system, now, now, now))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"agent {name!r} already exists") from None
        return AgentRecord(name, role, system, now, now, now)

    def fork(self, source: str, name: str) -> None:
        """Copy `source`'s role, system prompt and messages to a new agent, in one transaction."""
        try:
            with self._write() as db:
                self._copy(db, source, name, time.time())
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"agent {name!r} already exists") from None

    def get(self, name: str, with_messages: bool = True) -> AgentRecord:
        with self._read() as db:
            row = db.execute(
                "SELECT a.*, (SELECT COUNT(*) FROM messages m WHERE m.agent=a.name) AS n "
                "FROM agents a WHERE name=?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no agent named {name!r}")
            rec = _record(row)
            if with_messages:
                rec.messages = [
                    _message(r)
                    for r in db.execute("SELECT role, content, extra FROM messages WHERE agent=? ORDER BY seq", (name,))
                ]
        return rec

    def exists(self, name: str) -> bool:
        with self._read() as db:
            return db.execute("SELECT 1 FROM agents WHERE name=?", (name,)).fetchone() is not None

    def all(self) -> list[AgentRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT a.*, (SELECT COUNT(*) FROM messages m WHERE m.agent=a.name) AS n FROM agents a ORDER BY name"
            ).fetchall()
        return [_record(r) for r in rows]

    def most_recent(self, n: int) -> list[str]:
        with self._read() as db:
            rows = db.execute("SELECT name FROM agents ORDER BY last_used_at DESC LIMIT ?", (n,)).fetchall()
        return [r["name"] for r in rows]

    def append_turn(self, name: str, user: str, assistant: str) -> None:
        """Both messages of a turn, in one transaction: a turn is recorded whole or not at all."""
        self.commit_turn(name, [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    def commit_turn(
        self,
        name: str,
        messages: list[dict],
        *,
        keep: int | None = None,
        system: str | None = None,
        branch: str | None = None,
        response: tuple[str, str] | None = None,
    ) -> int:
        """Record one turn in one transaction; returns the transcript's length after it.

        `messages` are appended after the first `keep` stored messages (None: after all of
        them); with `system` the system prompt is replaced too. When that drops or changes
        anything, `branch` must name a new agent that receives the transcript as it was
        first, so a replaced conversation is never lost. `response` is `(id, body JSON)`
        of a Responses API object to store with the transcript length it ends at.
        """
        now = time.time()
        try:
            with self._write() as db:
                if branch is not None:
                    self._copy(db, name, branch, now)
                if keep is not None:
                    db.execute("DELETE FROM messages WHERE agent=? AND seq>=?", (name, keep))
                if system is not None:
                    db.execute("UPDATE agents SET system=? WHERE name=?", (system, name))
                (seq,) = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE agent=?", (name,)).fetchone()
                db.executemany(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                    [(name, seq + i, m["role"], m["content"], now, _extra(m)) for i, m in enumerate(messages)],
                )
                if db.execute("UPDATE agents SET updated_at=?, last_used_at=? WHERE name=?", (now, now, name)).rowcount != 1:
                    raise NotFound(f"no agent named {name!r}")
                length = seq + len(messages)
                if response is not None:
                    db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)", (response[0], name, now, length, response[1]))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"agent {branch!r} already exists") from None
        return length

    def _copy(self, db: sqlite3.Connection, source: str, name: str, now: float) -> None:
        if db.execute(
            "INSERT INTO agents SELECT ?, role, system, ?, ?, ? FROM agents WHERE name=?", (name, now, now, now, source)
        ).rowcount != 1:
            raise NotFound(f"no agent named {source!r}")
        db.execute(
            "INSERT INTO messages SELECT ?, seq, role, content, created_at, extra FROM messages WHERE agent=?",
            (name, source),
        )

    def free_branch_name(self, name: str) -> str:
        """The first of `<name>.b1`, `<name>.b2`, ... no agent has (case-insensitively).

        A name near the length limit is shortened first, so the branch name stays valid.
        """
        from .protocol import MAX_NAME_CHARS

        with self._read() as db:
            taken = {r[0].lower() for r in db.execute("SELECT name FROM agents")}
        n = 1
        while True:
            suffix = f".b{n}"
            candidate = name[: MAX_NAME_CHARS - len(suffix)] + suffix
            if candidate.lower() not in taken:
                return candidate
            n += 1

    def put_response(self, response_id: str, agent: str | None, n_messages: int, body: str) -> None:
        """Store a Responses API object that did not come with a turn commit (stateless)."""
        with self._write() as db:
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)", (response_id, agent, time.time(), n_messages, body))

    def has_response(self, response_id: str) -> bool:
        with self._read() as db:
            return db.execute("SELECT 1 FROM responses WHERE id=?", (response_id,)).fetchone() is not None

    def get_response(self, response_id: str) -> dict:
        """`{id, agent, created_at, n_messages, body}` of a stored response, or NotFound."""
        with self._read() as db:
            row = db.execute("SELECT * FROM responses WHERE id=?", (response_id,)).fetchone()
        if row is None:
            raise NotFound(f"no response with id {response_id!r}")
        return dict(row)

    def touch(self, name: str) -> None:
        with self._write() as db:
            db.execute("UPDATE agents SET last_used_at=? WHERE name=?", (time.time(), name))

    def reset(self, name: str) -> None:
        now = time.time()
        with self._write() as db:
            if db.execute("UPDATE agents SET updated_at=? WHERE name=?", (now, name)).rowcount != 1:
                raise NotFound(f"no agent named {name!r}")
            db.execute("DELETE FROM messages WHERE agent=?", (name,))

    def delete(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM agents WHERE name=?", (name,)).rowcount != 1:
                raise NotFound(f"no agent named {name!r}")

    def restore(self, rec: AgentRecord) -> None:
        """Re-insert a record recovered from elsewhere (a cache file's copy), if absent."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM agents WHERE name=?", (rec.name,)).fetchone():
                return
            db.execute(
                "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?)",
                (rec.name, rec.role, rec.system, rec.created_at, rec.updated_at, rec.last_used_at),
            )
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                [(rec.name, i, m["role"], m["content"], rec.updated_at, _extra(m)) for i, m in enumerate(rec.messages)],
            )

    def name_taken(self, name: str) -> bool:
        """Whether `name`, or a name differing from it only in case, is an agent's."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM agents WHERE name=? COLLATE NOCASE", (name,)).fetchone() is not None

    def add(self, rec: AgentRecord) -> None:
        """Insert a whole agent (record and messages) in one transaction; AlreadyExists if taken."""
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.name, rec.role, rec.system, rec.created_at, rec.updated_at, rec.last_used_at),
                )
                db.executemany(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                    [(rec.name, i, m["role"], m["content"], rec.updated_at, _extra(m)) for i, m in enumerate(rec.messages)],
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"agent {rec.name!r} already exists") from None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class _Tx:
    """`with` gives one transaction on the thread's connection (isolation_level=None)."""

    def __init__(self, db: sqlite3.Connection, begin: str, check: Callable[[], None] | None = None):
        self.db = db
        self.begin = begin
        self.check = check  # raises if the transaction must not (or did not usefully) happen

    def __enter__(self) -> sqlite3.Connection:
        if self.check:
            self.check()
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.db.execute("ROLLBACK")
            return
        self.db.execute("COMMIT")
        if self.check:
            self.check()  # the file may have gone during the transaction


def _extra(message: dict) -> str | None:
    extra = {k: message[k] for k in EXTRA_KEYS if message.get(k) is not None}
    return json.dumps(extra) if extra else None


def _message(row) -> dict:
    message = {"role": row["role"], "content": row["content"]}
    if row["extra"]:
        message.update(json.loads(row["extra"]))
    return message


def _record(row) -> AgentRecord:
    return AgentRecord(
        name=row["name"],
        role=row["role"],
        system=row["system"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
        n_messages=row["n"],
    )
