"""One dedicated PostgreSQL connection with a bound on every use, reconnected on demand.

Leases and wake-ups must not queue behind the state pool, and must give up on a database that
stops answering (a partition looks like a silent peer, not an error). A use that overruns
``op_timeout`` raises TimeoutError at once and the connection is abandoned: cancelling a query
on a dead link takes psycopg several seconds of its own, so that ends in the background and the
connection is closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from bridge.core.errors import StateError
from bridge.state.pg_schema import describe

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
log = logging.getLogger(__name__)

# What a use of the link can fail with when the database is away or refuses.
LINK_ERRORS = (psycopg.Error, OSError, TimeoutError, StateError)


class PgLink:
    def __init__(self, url: str, op_timeout: float) -> None:
        self.url = url
        self.op_timeout = op_timeout
        self._conn: Conn | None = None
        self._background: set[asyncio.Future[Any]] = set()

    async def run(self, use: Callable[[Conn], Awaitable[T]]) -> T:
        task = asyncio.ensure_future(self._use(use))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.op_timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise TimeoutError(f"the database did not answer within {self.op_timeout:g} s")
        try:
            return task.result()
        except (psycopg.OperationalError, OSError):
            await self.close()  # broken: the next use reconnects
            raise

    async def _use(self, use: Callable[[Conn], Awaitable[T]]) -> T:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(2, int(self.op_timeout))
                )
            except psycopg.Error as exc:
                raise StateError(describe(exc, self.url)) from exc
        return await use(self._conn)

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        task.cancel()
        conn, self._conn = self._conn, None
        self.spawn(_bury(task, conn))

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in the background; :meth:`drain` waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(_finished)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def drain(self, within: float) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=within)


async def _bury(task: asyncio.Future[Any], conn: Conn | None) -> None:
    """Let an abandoned use finish its own cancellation, then close its connection."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()


def _finished(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
