"""The PostgreSQL state's records of polled sources: cursors, bounded seen-sets, secrets.

Same semantics as the SQLite state file (``bridge.state``), method for method.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from bridge.state.pg_records import Conn, PgBase

_UPSERT_CURSOR = (
    "INSERT INTO cursors (source, key, value) VALUES (%s, %s, %s) ON CONFLICT (source, key) "
    "DO UPDATE SET value = excluded.value, updated_at = now()"
)


class PgSources(PgBase):
    # -- cursors, bounded seen-sets and secrets of polled sources --------------------------

    async def cursor(self, source: str, key: str) -> str | None:
        async def run(conn: Conn) -> str | None:
            cur = await conn.execute(
                "SELECT value FROM cursors WHERE source = %s AND key = %s", (source, key)
            )
            row = await cur.fetchone()
            return None if row is None else str(row[0])

        return await self._read(run)

    async def set_cursor(self, source: str, key: str, value: str) -> None:
        await self.set_source_values(source, {key: value})

    async def seen_filter(self, source: str, key: str, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already recorded as published."""

        async def run(conn: Conn) -> set[str]:
            cur = await conn.execute(
                "SELECT id FROM seen WHERE source = %s AND key = %s AND id = ANY(%s)",
                (source, key, list(dict.fromkeys(ids))),
            )
            return {r[0] for r in await cur.fetchall()}

        return await self._read(run)

    async def seen_add(self, source: str, key: str, ids: Sequence[str], keep: int) -> None:
        """Record ``ids`` as published; only the ``keep`` most recent stay."""

        async def run(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO seen (source, key, id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [(source, key, i) for i in ids],
                )
            await conn.execute(
                "DELETE FROM seen WHERE source = %(s)s AND key = %(k)s AND seq <= (SELECT seq "
                "FROM seen WHERE source = %(s)s AND key = %(k)s ORDER BY seq DESC LIMIT 1 "
                "OFFSET %(keep)s)",
                {"s": source, "k": key, "keep": keep},
            )

        await self._write(run)

    async def source_secret(self, source: str, key: str) -> str | None:
        """A secret of a polled source (a rotating refresh token), decrypted."""
        value = await self.cursor(source, key)
        return None if value is None else self._sealer.open(value)

    async def set_source_secret(self, source: str, key: str, value: str) -> None:
        """Stored in ``cursors``, encrypted with ``BRIDGE_STATE_KEY`` when one is set."""
        await self.set_cursor(source, key, self._sealer.seal(value))

    async def set_source_values(
        self, source: str, values: Mapping[str, str], *, secret: Collection[str] = ()
    ) -> None:
        """Several ``cursors`` rows in one transaction: all of them are written, or none."""
        rows = [(source, k, self._sealer.seal(v) if k in secret else v) for k, v in values.items()]

        async def run(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(_UPSERT_CURSOR, rows)

        await self._write(run)
