"""The two state backends behind one test seam, so one set of state tests runs on both.

Each backend opens (and reopens) the same store, shows every byte it holds at rest, and can
make writes to a table fail the way a broken disk or database would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import psycopg

from bridge.state import State
from bridge.state.open import StateStore
from bridge.state.pg import PgState


class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self, keys: Sequence[bytes] = ()) -> StateStore:
        return await State.open(str(self.path), keys)

    async def raw(self) -> bytes:
        data = self.path.read_bytes()
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                data += side.read_bytes()
        return data

    async def refuse(self, table: str, key: str | None = None, message: str = "refused") -> None:
        """Inserts and updates of ``table`` (rows whose ``key`` column is ``key``) fail."""
        when = f"WHEN NEW.key = '{key}' " if key else ""
        with sqlite3.connect(self.path) as conn:
            for op in ("INSERT", "UPDATE"):
                conn.execute(
                    f"CREATE TRIGGER refuse_{op.lower()} BEFORE {op} ON {table} {when}"
                    f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
                )

    async def allow(self) -> None:
        with sqlite3.connect(self.path) as conn:
            for op in ("insert", "update"):
                conn.execute(f"DROP TRIGGER IF EXISTS refuse_{op}")


class PostgresBackend:
    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self, keys: Sequence[bytes] = ()) -> StateStore:
        return await PgState.open(self.url, keys)

    async def _sql(self, *statements: str) -> list[tuple[object, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            rows: list[tuple[object, ...]] = []
            for statement in statements:
                cur = await conn.execute(statement)
                if cur.description is not None:
                    rows.extend(await cur.fetchall())
            return rows

    async def raw(self) -> bytes:
        """Every row of every table, as the server stores its text."""
        tables = [
            r[0]
            for r in await self._sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
        rows = await self._sql(*(f"SELECT t::text FROM {t} t" for t in tables))  # noqa: S608
        return "\n".join(str(r[0]) for r in rows).encode()

    async def refuse(self, table: str, key: str | None = None, message: str = "refused") -> None:
        when = f"WHEN (NEW.key = '{key}')" if key else ""
        await self._sql(
            "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW {when} "
            "EXECUTE FUNCTION refuse()",
        )

    async def allow(self) -> None:
        tables = [
            r[0]
            for r in await self._sql(
                "SELECT event_object_table FROM "
                "information_schema.triggers WHERE "
                "trigger_name = 'refuse' AND "
                "trigger_schema = current_schema()"
            )
        ]
        await self._sql(*(f"DROP TRIGGER refuse ON {t}" for t in set(tables)))


Backend = SqliteBackend | PostgresBackend
