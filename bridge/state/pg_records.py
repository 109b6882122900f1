"""The PostgreSQL state's records besides portals: the reservation journal, portal health,
parked rows and requests (the polled sources' records are in ``state_pg_sources``).

Same semantics as the SQLite state file (``bridge.state``), method for method. Every write is
one transaction; in a view made by ``PgState.fenced`` it also re-checks, in that transaction,
that this replica still holds the shard at the same epoch (``bridge.scaling.leases.check_lease``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from bridge.amqp.protocol import Confirmed
from bridge.core.errors import StateError
from bridge.scaling.fencing import Fence, check_lease
from bridge.state import JournalEntry, ParkedRecord
from bridge.state.pg_schema import describe
from bridge.state.sealing import Sealer

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


class Health:
    """The last write's outcome, shared by a state and every fenced view of it."""

    write_failure: str | None = None


class PgBase:
    def __init__(
        self, pool: AsyncConnectionPool[Conn], sealer: Sealer, url: str, fence: Fence | None
    ) -> None:
        self._pool = pool
        self._sealer = sealer
        self._url = url
        self._fence = fence
        self._health = Health()

    @property
    def write_failure(self) -> str | None:
        return self._health.write_failure

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            async with self._pool.connection() as conn:
                return await fn(conn)
        except psycopg.Error as exc:
            raise StateError(f"state database read failed: {describe(exc, self._url)}") from exc

    async def _write(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if self._fence is not None:
                    await check_lease(conn, self._fence)
                result = await fn(conn)
        except psycopg.Error as exc:
            self._health.write_failure = f"state database write failed: {describe(exc, self._url)}"
            raise StateError(self._health.write_failure) from exc
        self._health.write_failure = None
        return result


class PgRecords(PgBase):
    # -- journal of reservations -----------------------------------------------------------

    async def journal(self, member_id: str, connector: str) -> list[str]:
        return [entry.process_id for entry in await self.journal_entries(member_id, connector)]

    async def journal_entries(self, member_id: str, connector: str) -> list[JournalEntry]:
        """Reservations in flight, oldest first, with the message ids already confirmed."""

        async def run(conn: Conn) -> list[JournalEntry]:
            cur = await conn.execute(
                "SELECT j.process_id, j.replay, "
                "coalesce(array_agg(c.message_id) FILTER (WHERE c.message_id IS NOT NULL), "
                "'{}') FROM journal j LEFT JOIN confirmed c USING (member_id, connector, "
                "process_id) WHERE j.member_id = %s AND j.connector = %s "
                "GROUP BY j.process_id, j.replay, j.seq ORDER BY j.seq",
                (member_id, connector),
            )
            return [JournalEntry(r[0], bool(r[1]), frozenset(r[2])) for r in await cur.fetchall()]

        return await self._read(run)

    async def journal_all(self) -> list[tuple[str, str, str]]:
        async def run(conn: Conn) -> list[tuple[str, str, str]]:
            cur = await conn.execute(
                "SELECT member_id, connector, process_id FROM journal ORDER BY seq"
            )
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

        return await self._read(run)

    async def journal_add(
        self, member_id: str, connector: str, process_ids: Sequence[str], *, replay: bool = False
    ) -> None:
        """``replay``: reservations of parked rows, which are re-read with ``error=1``."""

        async def run(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO journal (member_id, connector, process_id, replay) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(member_id, connector, p, replay) for p in process_ids],
                )

        await self._write(run)

    async def journal_confirm(
        self, member_id: str, connector: str, confirmed: Mapping[str, Confirmed]
    ) -> None:
        """Remember which events of each reservation the broker confirmed, in one write: only
        a publisher's proof is accepted."""
        rows = [
            (member_id, connector, process_id, message_id)
            for process_id, proof in confirmed.items()
            for message_id in proof.keys
        ]

        async def run(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO confirmed VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", rows
                )

        if rows:
            await self._write(run)

    async def journal_remove(
        self, member_id: str, connector: str, process_ids: Sequence[str]
    ) -> None:
        async def run(conn: Conn) -> None:
            for table in ("journal", "confirmed"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE member_id = %s AND connector = %s "  # noqa: S608
                    "AND process_id = ANY(%s)",
                    (member_id, connector, list(process_ids)),
                )

        await self._write(run)

    # -- portal health, parked rows and requests to the serving process --------------------

    async def set_health(
        self, member_id: str, *, stop_reason: str | None = None, binding_error: str | None = None
    ) -> None:
        """Record why a portal is stopped or its binding failed ('' clears), for ``status``."""

        async def run(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO portal_health AS h (member_id, stop_reason, binding_error) "
                "VALUES (%(m)s, coalesce(%(s)s, ''), coalesce(%(b)s, '')) "
                "ON CONFLICT (member_id) DO UPDATE SET "
                "stop_reason = coalesce(%(s)s, h.stop_reason), "
                "binding_error = coalesce(%(b)s, h.binding_error), updated_at = now()",
                {"m": member_id, "s": stop_reason, "b": binding_error},
            )

        await self._write(run)

    async def health(self) -> dict[str, tuple[str, str]]:
        """member_id → (stop reason, binding error); empty strings when healthy."""

        async def run(conn: Conn) -> dict[str, tuple[str, str]]:
            cur = await conn.execute(
                "SELECT member_id, stop_reason, binding_error FROM portal_health"
            )
            return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}

        return await self._read(run)

    async def park(self, source: str, key: str, ref: str, reason: str, payload: str) -> None:
        """Keep an event the source cannot hand over (e.g. a malformed row) in the state."""

        async def run(conn: Conn) -> None:
            # A replaced row moves to the end, as SQLite's INSERT OR REPLACE does.
            await conn.execute(
                "INSERT INTO parked (source, key, ref, reason, payload, parked_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source, key, ref) DO UPDATE SET "
                "reason = excluded.reason, payload = excluded.payload, "
                "parked_at = excluded.parked_at, seq = DEFAULT",
                (source, key, ref, reason, payload, time.time()),
            )

        await self._write(run)

    async def parked(self, source: str | None = None) -> list[ParkedRecord]:
        async def run(conn: Conn) -> list[ParkedRecord]:
            cur = await conn.execute(
                "SELECT source, key, ref, reason, payload, parked_at FROM parked "
                "WHERE %(s)s::text IS NULL OR source = %(s)s ORDER BY parked_at, seq",
                {"s": source},
            )
            return [ParkedRecord(*r) for r in await cur.fetchall()]

        return await self._read(run)

    async def request(self, member_id: str, kind: str) -> None:
        """Ask the process that serves this portal to do ``kind`` for it."""

        async def run(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO requests (member_id, kind) VALUES (%s, %s) "
                "ON CONFLICT (member_id, kind) DO UPDATE SET seq = DEFAULT",
                (member_id, kind),
            )

        await self._write(run)

    async def take_requests(self, kind: str) -> list[str]:
        """The member ids that asked for ``kind``; each request is answered once."""

        async def run(conn: Conn) -> list[str]:
            cur = await conn.execute(
                "DELETE FROM requests WHERE kind = %s RETURNING member_id, seq", (kind,)
            )
            return [r[0] for r in sorted(await cur.fetchall(), key=lambda r: r[1])]

        return await self._write(run)
