"""Durable state in PostgreSQL (scaled mode): the SQLite state file's interface, for replicas.

The same methods with the same meaning as ``bridge.state.State``; tokens are sealed with
``BRIDGE_STATE_KEY`` exactly as there. Each call takes a connection from a pool and every
write is one committed transaction before the call returns. Two additions serve several
replicas: :meth:`PgState.refresh_portal` (a token refresh under the portal row's lock, so no
refresh token is presented twice) and :meth:`PgState.fenced` (a view whose writes re-check the
shard's lease in their own transaction).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bridge.core.errors import StateError, TokenError
from bridge.scaling.fencing import Fence
from bridge.state import UNINSTALLED, Portal
from bridge.state.pg_records import Conn, PgRecords
from bridge.state.pg_schema import describe, migrate, redact
from bridge.state.pg_sources import PgSources
from bridge.state.sealing import SECRET_FIELDS, Sealer

Exchange = Callable[[Portal], Awaitable[Portal]]

_PORTAL_COLUMNS = (
    "member_id, domain, client_endpoint, server_endpoint, access_token, refresh_token, "
    "application_token, expires_at, status"
)


@dataclass(frozen=True, slots=True)
class Refreshed:
    portal: Portal
    exchanged: bool  # False: another replica had refreshed already; its tokens were adopted


class PgState(PgRecords, PgSources):
    """The state database. Construct with :meth:`open`."""

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, keys: Sequence[bytes] = (), *, pool_size: int = 10) -> PgState:
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
            name="bridge-state",
        )
        try:
            # One direct connection first: a wrong URL fails at once with the server's reason,
            # where the pool would keep retrying until its timeout.
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=10
            ) as conn:
                await migrate(conn)
            await pool.open(wait=True, timeout=15)
        except (psycopg.Error, OSError) as exc:
            await pool.close()
            raise StateError(
                f"cannot open the state database {redact(url)}: {describe(exc, url)}"
            ) from exc
        state = cls(pool, Sealer(keys), url, None)
        try:
            await state._check_keys()
            if len(keys) > 1:
                # A key rotation in progress: re-encrypt now, so the old key can go right away.
                await state.rotate_keys()
        except BaseException:
            await state.close()
            raise
        return state

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        """For lease checks and wake-ups that share this state's connections."""
        return self._pool

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """One replica at a time (an advisory lock named ``name``), e.g. for the bootstrap."""
        key = zlib.crc32(name.encode())
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                try:
                    yield
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error as exc:
            raise StateError(f"state database lock failed: {describe(exc, self._url)}") from exc

    def fenced(self, fence: Fence) -> PgState:
        """This state, with every write refused (LeaseLost) unless ``fence``'s lease holds."""
        view = PgState(self._pool, self._sealer, self._url, fence)
        view._health = self._health
        return view

    # -- secrets ---------------------------------------------------------------------------

    async def _check_keys(self) -> None:
        async def run(conn: Conn) -> None:
            cur = await conn.execute(
                "SELECT access_token, refresh_token, application_token FROM portals"
            )
            for row in await cur.fetchall():
                for value in row:
                    self._sealer.open(value)

        await self._read(run)

    async def rotate_keys(self) -> int:
        """Re-encrypt every stored token with the first key; answers how many portals changed."""

        async def run(conn: Conn) -> int:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {_PORTAL_COLUMNS} FROM portals FOR UPDATE")  # noqa: S608
            portals = [self._portal(r) for r in await cur.fetchall()]
            for portal in portals:
                await conn.execute(
                    "UPDATE portals SET access_token = %s, refresh_token = %s, "
                    "application_token = %s WHERE member_id = %s",
                    (
                        *(self._sealer.seal(getattr(portal, f)) for f in SECRET_FIELDS),
                        portal.member_id,
                    ),
                )
            return len(portals)

        return await self._write(run)

    # -- portals ---------------------------------------------------------------------------

    def _portal(self, row: dict[str, Any]) -> Portal:
        data = {k: row[k] for k in _PORTAL_COLUMNS.split(", ")}
        for name in SECRET_FIELDS:
            data[name] = self._sealer.open(data[name])
        return Portal(**data)

    async def _select(self, conn: Conn, where: str, args: Sequence[Any]) -> list[Portal]:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {_PORTAL_COLUMNS} FROM portals {where}", args)  # noqa: S608
        return [self._portal(r) for r in await cur.fetchall()]

    async def portals(self, *, include_inactive: bool = False) -> list[Portal]:
        where = "" if include_inactive else "WHERE status = 'active'"

        async def run(conn: Conn) -> list[Portal]:
            # COLLATE "C": the byte order SQLite sorts by.
            return await self._select(conn, where + ' ORDER BY domain COLLATE "C"', ())

        return await self._read(run)

    async def portal(self, member_id: str) -> Portal | None:
        async def run(conn: Conn) -> Portal | None:
            found = await self._select(conn, "WHERE member_id = %s", (member_id,))
            return found[0] if found else None

        return await self._read(run)

    async def save_portal(self, portal: Portal) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO portals ({_PORTAL_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "  # noqa: S608
                "ON CONFLICT (member_id) DO UPDATE SET domain = excluded.domain, "
                "client_endpoint = excluded.client_endpoint, "
                "server_endpoint = excluded.server_endpoint, "
                "access_token = excluded.access_token, refresh_token = excluded.refresh_token, "
                "application_token = excluded.application_token, "
                "expires_at = excluded.expires_at, status = excluded.status, "
                "token_version = portals.token_version + 1, updated_at = now()",
                (
                    portal.member_id,
                    portal.domain,
                    portal.client_endpoint,
                    portal.server_endpoint,
                    *(self._sealer.seal(getattr(portal, f)) for f in SECRET_FIELDS),
                    portal.expires_at,
                    portal.status,
                ),
            )

        await self._write(run)

    async def uninstall(self, member_id: str) -> None:
        """Forget the tokens of an uninstalled portal; keep its journal for the record."""

        async def run(conn: Conn) -> None:
            await conn.execute(
                "UPDATE portals SET status = %s, access_token = '', refresh_token = '', "
                "expires_at = 0, token_version = token_version + 1, updated_at = now() "
                "WHERE member_id = %s",
                (UNINSTALLED, member_id),
            )

        await self._write(run)

    async def refresh_portal(
        self, member_id: str, failed_token: str, exchange: Exchange
    ) -> Refreshed:
        """Refresh a portal's tokens once, whichever replica asks.

        Under the portal row's lock: if the stored access token is no longer ``failed_token``,
        another replica refreshed while we waited, and its tokens are adopted. Otherwise
        ``exchange`` presents the *stored* refresh token to the OAuth server and its answer is
        written, with the row's version checked, before the lock goes. When that write fails
        after the exchange succeeded, StateError is raised and the caller, whose ``exchange``
        saw the new pair, must keep it.
        """

        async def run(conn: Conn) -> Refreshed:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {_PORTAL_COLUMNS}, token_version FROM portals "  # noqa: S608
                "WHERE member_id = %s FOR UPDATE",
                (member_id,),
            )
            row = await cur.fetchone()
            if row is None or row["status"] == UNINSTALLED or not row["refresh_token"]:
                raise TokenError("no_refresh_token", "no stored refresh token for this portal")
            stored = self._portal(row)
            if stored.access_token != failed_token:
                return Refreshed(stored, exchanged=False)
            fresh = await exchange(stored)
            cur = await conn.execute(
                "UPDATE portals SET access_token = %s, refresh_token = %s, expires_at = %s, "
                "token_version = token_version + 1, updated_at = now() "
                "WHERE member_id = %s AND token_version = %s",
                (
                    self._sealer.seal(fresh.access_token),
                    self._sealer.seal(fresh.refresh_token),
                    fresh.expires_at,
                    member_id,
                    row["token_version"],
                ),
            )
            if cur.rowcount != 1:
                raise StateError("the portal's tokens changed under its row lock")
            return Refreshed(fresh, exchanged=True)

        return await self._write(run)
