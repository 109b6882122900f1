"""Durable state in one SQLite file: portals with their tokens, and the journal of reservations.

Every write is committed with ``synchronous=FULL`` before the call returns, so a step that
depends on it (publishing a reserved page, using a refreshed token) only runs after the write
is on disk. All SQLite work happens on one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from bridge.amqp.protocol import Confirmed
from bridge.core.errors import StateError
from bridge.state.sealing import SECRET_FIELDS as _SECRET_FIELDS
from bridge.state.sealing import Sealer

T = TypeVar("T")

ACTIVE = "active"
UNINSTALLED = "uninstalled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS portals (
    member_id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    client_endpoint TEXT NOT NULL,
    server_endpoint TEXT NOT NULL DEFAULT '',
    access_token TEXT NOT NULL DEFAULT '',
    refresh_token TEXT NOT NULL DEFAULT '',
    application_token TEXT NOT NULL DEFAULT '',
    expires_at REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    member_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    process_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (member_id, connector, process_id)
);
CREATE TABLE IF NOT EXISTS confirmed_pages (
    member_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    process_id TEXT NOT NULL,
    message_ids TEXT NOT NULL,  -- space-separated MESSAGE_IDs (32 hex characters each)
    PRIMARY KEY (member_id, connector, process_id)
);
CREATE TABLE IF NOT EXISTS portal_health (
    member_id TEXT PRIMARY KEY,
    stop_reason TEXT NOT NULL DEFAULT '',
    binding_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    ref TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,
    parked_at REAL NOT NULL,
    PRIMARY KEY (source, key, ref)
);
CREATE TABLE IF NOT EXISTS requests (
    member_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (member_id, kind)
);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS seen (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (source, key, id)
);
"""


@dataclass(frozen=True, slots=True)
class Portal:
    member_id: str
    domain: str
    client_endpoint: str
    server_endpoint: str = ""
    access_token: str = ""
    refresh_token: str = ""
    application_token: str = ""
    expires_at: float = 0.0
    status: str = ACTIVE

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def __repr__(self) -> str:
        # Tokens never reach a log line through repr().
        return (
            f"Portal(member_id={self.member_id!r}, domain={self.domain!r}, status={self.status!r})"
        )

    def with_tokens(self, access: str, refresh: str, expires_at: float) -> Portal:
        return replace(self, access_token=access, refresh_token=refresh, expires_at=expires_at)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    process_id: str
    replay: bool  # a reservation of parked rows: re-read with error=1
    confirmed: frozenset[str]  # MESSAGE_IDs the broker confirmed, not yet cleared


@dataclass(frozen=True, slots=True)
class ParkedRecord:
    source: str
    key: str
    ref: str
    reason: str
    payload: str
    parked_at: float


class State:
    """The state file. Construct with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, keys: list[bytes]):
        self._conn = conn
        self._executor = executor
        self._sealer = Sealer(keys)
        self.write_failure: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str, keys: Sequence[bytes] = ()) -> State:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        state = cls(conn, executor, list(keys))
        try:
            await state._run(state._check_keys)
            if len(keys) > 1:
                # A key rotation in progress: re-encrypt now, so the old key can go right away.
                await state.rotate_keys()
        except BaseException:
            await state.close()
            raise
        return state

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def _write(self, fn: Callable[[], T]) -> T:
        try:
            result = await self._run(fn)
        except sqlite3.Error as exc:
            self.write_failure = f"state file write failed: {exc}"
            raise StateError(self.write_failure) from exc
        self.write_failure = None
        return result

    # -- secrets ---------------------------------------------------------------------------

    def _seal(self, value: str) -> str:
        return self._sealer.seal(value)

    def _open_secret(self, value: str) -> str:
        return self._sealer.open(value)

    def _check_keys(self) -> None:
        for row in self._conn.execute(
            "SELECT access_token, refresh_token, application_token FROM portals"
        ):
            for value in row:
                self._open_secret(value)

    async def rotate_keys(self) -> int:
        """Re-encrypt every stored token with the first key; answers how many portals changed."""

        def run() -> int:
            rows = self._conn.execute("SELECT * FROM portals").fetchall()
            with self._conn:
                for row in rows:
                    portal = self._portal(row)
                    self._conn.execute(
                        "UPDATE portals SET access_token=?, refresh_token=?, application_token=? "
                        "WHERE member_id=?",
                        (
                            *(self._seal(getattr(portal, f)) for f in _SECRET_FIELDS),
                            portal.member_id,
                        ),
                    )
            return len(rows)

        return await self._write(run)

    # -- portals ---------------------------------------------------------------------------

    def _portal(self, row: sqlite3.Row) -> Portal:
        data: dict[str, Any] = dict(row)
        data.pop("updated_at", None)
        for name in _SECRET_FIELDS:
            data[name] = self._open_secret(data[name])
        return Portal(**data)

    async def portals(self, *, include_inactive: bool = False) -> list[Portal]:
        def run() -> list[Portal]:
            sql = "SELECT * FROM portals"
            if not include_inactive:
                sql += " WHERE status = 'active'"
            return [self._portal(r) for r in self._conn.execute(sql + " ORDER BY domain")]

        return await self._run(run)

    async def portal(self, member_id: str) -> Portal | None:
        def run() -> Portal | None:
            row = self._conn.execute(
                "SELECT * FROM portals WHERE member_id=?", (member_id,)
            ).fetchone()
            return None if row is None else self._portal(row)

        return await self._run(run)

    async def save_portal(self, portal: Portal) -> None:
        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "INSERT INTO portals (member_id, domain, client_endpoint, server_endpoint, "
                    "access_token, refresh_token, application_token, expires_at, status, "
                    "updated_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(member_id) DO UPDATE SET "
                    "domain=excluded.domain, client_endpoint=excluded.client_endpoint, "
                    "server_endpoint=excluded.server_endpoint, access_token=excluded.access_token, "
                    "refresh_token=excluded.refresh_token, "
                    "application_token=excluded.application_token, expires_at=excluded.expires_at, "
                    "status=excluded.status, updated_at=excluded.updated_at",
                    (
                        portal.member_id,
                        portal.domain,
                        portal.client_endpoint,
                        portal.server_endpoint,
                        self._seal(portal.access_token),
                        self._seal(portal.refresh_token),
                        self._seal(portal.application_token),
                        portal.expires_at,
                        portal.status,
                        time.time(),
                    ),
                )

        await self._write(run)

    async def uninstall(self, member_id: str) -> None:
        """Forget the tokens of an uninstalled portal; keep its journal for the record."""

        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "UPDATE portals SET status=?, access_token='', refresh_token='', "
                    "expires_at=0, updated_at=? WHERE member_id=?",
                    (UNINSTALLED, time.time(), member_id),
                )

        await self._write(run)

    # -- journal of reservations -----------------------------------------------------------

    async def journal(self, member_id: str, connector: str) -> list[str]:
        return [entry.process_id for entry in await self.journal_entries(member_id, connector)]

    async def journal_entries(self, member_id: str, connector: str) -> list[JournalEntry]:
        """Reservations in flight, oldest first, with the message ids already confirmed."""

        def run() -> list[JournalEntry]:
            rows = self._conn.execute(
                "SELECT process_id, replay FROM journal WHERE member_id=? AND connector=? "
                "ORDER BY created_at, rowid",
                (member_id, connector),
            ).fetchall()
            marks: dict[str, set[str]] = {}
            for process_id, message_ids in self._conn.execute(
                "SELECT process_id, message_ids FROM confirmed_pages "
                "WHERE member_id=? AND connector=?",
                (member_id, connector),
            ):
                marks.setdefault(process_id, set()).update(message_ids.split())
            return [JournalEntry(r[0], bool(r[1]), frozenset(marks.get(r[0], ()))) for r in rows]

        return await self._run(run)

    async def journal_all(self) -> list[tuple[str, str, str]]:
        def run() -> list[tuple[str, str, str]]:
            rows = self._conn.execute(
                "SELECT member_id, connector, process_id FROM journal ORDER BY created_at, rowid"
            )
            return [(r[0], r[1], r[2]) for r in rows]

        return await self._run(run)

    async def journal_add(
        self,
        member_id: str,
        connector: str,
        process_ids: Sequence[str],
        *,
        replay: bool = False,
    ) -> None:
        """``replay``: reservations of parked rows, which are re-read with ``error=1``."""

        def run() -> None:
            now = time.time()
            with self._conn:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO journal (member_id, connector, process_id, "
                    "created_at, replay) VALUES (?,?,?,?,?)",
                    [(member_id, connector, p, now, int(replay)) for p in process_ids],
                )

        await self._write(run)

    async def journal_confirm(
        self, member_id: str, connector: str, confirmed: Mapping[str, Confirmed]
    ) -> None:
        """Remember which events of each reservation the broker confirmed, in one write: only a
        publisher's proof is accepted. A later attempt then clears them without publishing
        them again."""

        # One row per reservation, not per event: a pipelined run confirms thousands of events.
        def run() -> None:
            with self._conn:
                self._conn.executemany(
                    "INSERT INTO confirmed_pages VALUES (?,?,?,?) "
                    "ON CONFLICT(member_id, connector, process_id) DO UPDATE SET "
                    "message_ids = message_ids || ' ' || excluded.message_ids",
                    [
                        (member_id, connector, process_id, " ".join(proof.keys))
                        for process_id, proof in confirmed.items()
                    ],
                )

        if confirmed:
            await self._write(run)

    async def journal_remove(
        self, member_id: str, connector: str, process_ids: Sequence[str]
    ) -> None:
        def run() -> None:
            keys = [(member_id, connector, p) for p in process_ids]
            with self._conn:
                self._conn.executemany(
                    "DELETE FROM journal WHERE member_id=? AND connector=? AND process_id=?", keys
                )
                self._conn.executemany(
                    "DELETE FROM confirmed_pages WHERE member_id=? AND connector=? "
                    "AND process_id=?",
                    keys,
                )

        await self._write(run)

    # -- portal health, parked rows and requests to the serving process --------------------

    async def set_health(
        self, member_id: str, *, stop_reason: str | None = None, binding_error: str | None = None
    ) -> None:
        """Record why a portal is stopped or its binding failed ('' clears), for ``status``."""

        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "INSERT OR IGNORE INTO portal_health VALUES (?, '', '', ?)",
                    (member_id, time.time()),
                )
                if stop_reason is not None:
                    self._conn.execute(
                        "UPDATE portal_health SET stop_reason=?, updated_at=? WHERE member_id=?",
                        (stop_reason, time.time(), member_id),
                    )
                if binding_error is not None:
                    self._conn.execute(
                        "UPDATE portal_health SET binding_error=?, updated_at=? WHERE member_id=?",
                        (binding_error, time.time(), member_id),
                    )

        await self._write(run)

    async def health(self) -> dict[str, tuple[str, str]]:
        """member_id → (stop reason, binding error); empty strings when healthy."""

        def run() -> dict[str, tuple[str, str]]:
            rows = self._conn.execute(
                "SELECT member_id, stop_reason, binding_error FROM portal_health"
            )
            return {r[0]: (r[1], r[2]) for r in rows}

        return await self._run(run)

    async def park(self, source: str, key: str, ref: str, reason: str, payload: str) -> None:
        """Keep an event the source cannot hand over (e.g. a malformed row) in the state file."""

        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO parked VALUES (?,?,?,?,?,?)",
                    (source, key, ref, reason, payload, time.time()),
                )

        await self._write(run)

    async def parked(self, source: str | None = None) -> list[ParkedRecord]:
        def run() -> list[ParkedRecord]:
            sql = "SELECT source, key, ref, reason, payload, parked_at FROM parked"
            args: tuple[str, ...] = ()
            if source is not None:
                sql, args = sql + " WHERE source=?", (source,)
            rows = self._conn.execute(sql + " ORDER BY parked_at, rowid", args)
            return [ParkedRecord(*r) for r in rows]

        return await self._run(run)

    async def request(self, member_id: str, kind: str) -> None:
        """Ask the process that serves this state file to do ``kind`` for a portal."""

        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO requests VALUES (?,?,?)", (member_id, kind, time.time())
                )

        await self._write(run)

    async def take_requests(self, kind: str) -> list[str]:
        """The member ids that asked for ``kind``; each request is answered once."""

        def run() -> list[str]:
            with self._conn:
                rows = self._conn.execute(
                    "SELECT member_id FROM requests WHERE kind=? ORDER BY created_at", (kind,)
                ).fetchall()
                self._conn.execute("DELETE FROM requests WHERE kind=?", (kind,))
            return [r[0] for r in rows]

        return await self._write(run)

    # -- cursors of polled sources ---------------------------------------------------------

    async def cursor(self, source: str, key: str) -> str | None:
        def run() -> str | None:
            row = self._conn.execute(
                "SELECT value FROM cursors WHERE source=? AND key=?", (source, key)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._run(run)

    async def set_cursor(self, source: str, key: str, value: str) -> None:
        def run() -> None:
            with self._conn:
                self._conn.execute(
                    "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(source, key) DO UPDATE SET "
                    "value=excluded.value, updated_at=excluded.updated_at",
                    (source, key, value, time.time()),
                )

        await self._write(run)

    # -- bounded seen-sets and secrets of polled sources -----------------------------------

    async def seen_filter(self, source: str, key: str, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already recorded as published."""

        def run() -> set[str]:
            found: set[str] = set()
            unique = list(dict.fromkeys(ids))
            for start in range(0, len(unique), 500):  # well under SQLite's variable limit
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT id FROM seen WHERE source=? AND key=? AND id IN ({marks})",  # noqa: S608
                    (source, key, *chunk),
                )
                found.update(r[0] for r in rows)
            return found

        return await self._run(run)

    async def seen_add(self, source: str, key: str, ids: Sequence[str], keep: int) -> None:
        """Record ``ids`` as published; only the ``keep`` most recent stay."""

        def run() -> None:
            now = time.time()
            with self._conn:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO seen VALUES (?,?,?,?)",
                    [(source, key, i, now) for i in ids],
                )
                self._conn.execute(
                    "DELETE FROM seen WHERE source=? AND key=? AND rowid <= (SELECT rowid FROM "
                    "seen WHERE source=? AND key=? ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (source, key, source, key, keep),
                )

        await self._write(run)

    async def source_secret(self, source: str, key: str) -> str | None:
        """A secret of a polled source (a rotating refresh token), decrypted."""
        value = await self.cursor(source, key)
        return None if value is None else self._open_secret(value)

    async def set_source_secret(self, source: str, key: str, value: str) -> None:
        """Stored in ``cursors``, encrypted with ``BRIDGE_STATE_KEY`` when one is set."""
        await self.set_cursor(source, key, self._seal(value))

    async def set_source_values(
        self, source: str, values: Mapping[str, str], *, secret: Collection[str] = ()
    ) -> None:
        """Several ``cursors`` rows in one transaction: all of them are on disk, or none.

        The keys named in ``secret`` are sealed like :meth:`set_source_secret`.
        """

        def run() -> None:
            now = time.time()
            rows = [
                (source, k, self._seal(v) if k in secret else v, now) for k, v in values.items()
            ]
            with self._conn:
                self._conn.executemany(
                    "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(source, key) DO UPDATE SET "
                    "value=excluded.value, updated_at=excluded.updated_at",
                    rows,
                )

        await self._write(run)


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added after the first release; SQLite adds them in place."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(journal)")}
    if "replay" not in columns:
        conn.execute("ALTER TABLE journal ADD COLUMN replay INTEGER NOT NULL DEFAULT 0")


def _connect(path: str) -> sqlite3.Connection:
    file = Path(path)
    try:
        if str(file) != ":memory:" and not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only before SQLite opens it: it holds administrator tokens.
            os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        _migrate(conn)
        conn.isolation_level = "DEFERRED"
        for suffix in ("-wal", "-shm"):
            side = Path(f"{file}{suffix}")
            if side.exists():
                side.chmod(0o600)
    except (OSError, sqlite3.Error) as exc:
        raise StateError(f"cannot open the state file {path}: {exc}") from exc
    return conn
