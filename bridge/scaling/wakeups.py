"""Wake-ups forwarded between replicas with PostgreSQL's LISTEN/NOTIFY.

Any replica may receive a portal's ``ONOFFLINEEVENT``; the one that owns the portal's shard has
to drain it. The receiver sends ``pg_notify`` on one channel with the portal's member id (and
the notification's ``ts``); every replica listens, and the one that owns the shard wakes that
portal. A notification is delivered only to sessions listening at that moment, so after the
listener reconnects ``on_gap`` runs (the owner then drains its portals once), and the safety
poll covers anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from bridge.core.errors import StateError
from bridge.scaling.pg_link import LINK_ERRORS, Conn, PgLink
from bridge.state.pg_schema import describe

log = logging.getLogger(__name__)

CHANNEL = "bridge_wakeup"
_MAX_MEMBER_ID = 100  # Bitrix24's are 32 hex digits; NOTIFY payloads stop at 8000 bytes


@dataclass(frozen=True, slots=True)
class Wakeup:
    member_id: str
    ts: float | None = None  # the notification's own ``ts``, when it carried one


def _payload(wakeup: Wakeup) -> str:
    member_id = wakeup.member_id
    if not member_id or len(member_id) > _MAX_MEMBER_ID or not member_id.isprintable():
        raise ValueError("a wake-up needs a member id of 1 to 100 printable characters")
    return json.dumps({"member_id": member_id, "ts": wakeup.ts}, separators=(",", ":"))


def parse(payload: str) -> Wakeup | None:
    try:
        data: Any = json.loads(payload)
        wakeup = Wakeup(str(data["member_id"]), None if data["ts"] is None else float(data["ts"]))
        _payload(wakeup)
        if wakeup.ts is not None and not math.isfinite(wakeup.ts):
            return None
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    return wakeup


async def forward(conn: Conn, wakeup: Wakeup, channel: str = CHANNEL) -> None:
    """Send a wake-up to every listening replica (on commit, if ``conn`` is in a transaction)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, _payload(wakeup)))


class WakeupListener:
    def __init__(
        self,
        url: str,
        on_wakeup: Callable[[Wakeup], None],
        *,
        on_gap: Callable[[], None] | None = None,
        channel: str = CHANNEL,
        probe_every: float = 5.0,
        retry_after: float = 1.0,
    ) -> None:
        self._link = PgLink(url, op_timeout=probe_every)
        self._on_wakeup, self._on_gap = on_wakeup, on_gap
        self._channel, self._probe_every, self._retry_after = channel, probe_every, retry_after
        self._listening_on: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.reconnects = 0
        self.rejected = 0  # payloads that were not a wake-up

    async def start(self) -> None:
        """Listen before returning (raises StateError if the database cannot be reached)."""
        try:
            await self._link.run(self._listen)
        except LINK_ERRORS as exc:
            await self._link.close()
            raise StateError(
                f"cannot listen for wake-ups: {describe(exc, self._link.url)}"
            ) from exc
        self._task = asyncio.create_task(self._run(), name="wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._link.close()
        await self._link.drain(within=10)

    async def _listen(self, conn: Conn) -> Conn:
        if conn is not self._listening_on:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listening_on = conn
            self.listening.set()
        return conn

    async def _run(self) -> None:
        gap = False
        while True:
            try:
                conn = await self._link.run(self._listen)
                if gap:
                    gap, self.reconnects = False, self.reconnects + 1
                    if self._on_gap is not None:
                        self._on_gap()
                async for note in conn.notifies(timeout=self._probe_every):
                    self._dispatch(note.payload)
                # Quiet for a while: make sure the link is alive, not silently partitioned.
                await self._link.run(lambda c: c.execute("SELECT 1"))
            except LINK_ERRORS as exc:
                gap = True
                self.listening.clear()
                self._listening_on = None
                await self._link.close()
                reason = describe(exc, self._link.url)
                log.warning("wake-up listener lost its link", extra={"reason": reason})
                await asyncio.sleep(self._retry_after)

    def _dispatch(self, payload: str) -> None:
        wakeup = parse(payload)
        if wakeup is None:
            self.rejected += 1
            log.warning("malformed wake-up ignored", extra={"size": len(payload)})
            return
        self._on_wakeup(wakeup)
