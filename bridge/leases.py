"""Shard ownership in scaled mode: leases in PostgreSQL, renewed together, fenced locally.

Each shard is a row of ``leases`` (holder, epoch, expiry from the database clock). Every
``renew_every`` seconds a replica heartbeats in ``replicas`` and renews all of its leases in one
statement, then evens out: it hands over shards above its fair share and claims free or expired
ones up to it (``FOR UPDATE SKIP LOCKED``; each takeover adds 1 to the epoch). The fair share
ranks the live replicas by id: of ``N`` shards over ``R`` replicas the first ``N mod R`` take
``ceil(N/R)`` and the others ``floor(N/R)``, so counts end within ±1 of each other (a bare
``ceil`` cap could leave 22/22/20).

Fencing: a shard's local deadline is the monotonic time at which its last successful renewal
was *sent*, plus the TTL. The database computed the lease's expiry later than that, so by the
time another replica may take it over, this one has already stopped (``owns`` is false),
however unreachable the database is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.errors import ConfigError, LeaseLost, StateError
from bridge.fencing import Fence
from bridge.pg_schema import describe, migrate

log = logging.getLogger(__name__)

ShardEvent = Callable[[int, int], Awaitable[None]]  # (shard, epoch)
Conn = psycopg.AsyncConnection[Any]

_RENEW = """
WITH beat AS (
    INSERT INTO replicas VALUES (%(me)s, %(n)s, now() + %(ttl)s * interval '1 second')
    ON CONFLICT (replica_id) DO UPDATE SET shards = excluded.shards,
        expires_at = excluded.expires_at
)
UPDATE leases SET expires_at = now() + %(ttl)s * interval '1 second'
WHERE holder = %(me)s AND expires_at > now()
    AND (shard, epoch) IN (SELECT * FROM unnest(%(shards)s::int[], %(epochs)s::bigint[]))
RETURNING shard, epoch
"""
_CLAIM = """
WITH free AS (
    SELECT shard FROM leases
    WHERE shard < %(n)s AND NOT shard = ANY(%(mine)s::int[])
        AND (holder = '' OR holder = %(me)s OR expires_at <= now())
    ORDER BY shard LIMIT %(need)s FOR UPDATE SKIP LOCKED
)
UPDATE leases l SET holder = %(me)s, epoch = l.epoch + 1,
    expires_at = now() + %(ttl)s * interval '1 second'
FROM free WHERE l.shard = free.shard
RETURNING l.shard, l.epoch
"""
_RELEASE = (
    "UPDATE leases SET holder = '', expires_at = '-infinity' "
    "WHERE holder = %s AND shard = ANY(%s::int[])"
)


def fair_share(shards: int, live: Iterable[str], me: str) -> int:
    ranked = sorted({*live, me})
    base, extra = divmod(shards, len(ranked))
    return base + (1 if ranked.index(me) < extra else 0)


@dataclass(slots=True)
class _Held:
    epoch: int
    deadline: float


class LeaseManager:
    def __init__(
        self,
        url: str,
        replica_id: str,
        *,
        shards: int = 64,
        ttl: float = 10.0,
        renew_every: float = 2.0,
        op_timeout: float | None = None,
        on_gained: ShardEvent | None = None,
        on_lost: ShardEvent | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if shards < 1 or ttl <= 0 or not 0 < renew_every < ttl or not replica_id:
            raise ConfigError("leases need shards ≥ 1, 0 < renew_every < ttl and a replica id")
        self.replica_id = replica_id
        self.shards, self.ttl, self.renew_every = shards, ttl, renew_every
        self.op_timeout = op_timeout or max(renew_every, ttl / 3)
        self._url, self._clock = url, clock
        self._on_gained, self._on_lost = on_gained, on_lost
        self._held: dict[int, _Held] = {}
        self._leaving: set[int] = set()
        self._conn: Conn | None = None
        self._io = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.failed_rounds = 0  # rounds that could not reach the database

    # -- what this replica may do ------------------------------------------------------

    def owns(self, shard: int) -> bool:
        """True while the shard is ours, not being handed over, and its deadline is ahead."""
        return shard not in self._leaving and self._held_at(shard, None)

    def owned(self) -> dict[int, int]:
        return {s: h.epoch for s, h in self._held.items() if self.owns(s)}

    def fence(self, shard: int) -> Fence:
        held = self._held.get(shard)
        if held is None or not self.owns(shard):
            raise LeaseLost(f"shard {shard} is not held by {self.replica_id}")
        return Fence(self.replica_id, shard, held.epoch, self._held_at)

    def deadline(self, shard: int) -> float | None:
        held = self._held.get(shard)
        return None if held is None else held.deadline

    def _held_at(self, shard: int, epoch: int | None) -> bool:
        held = self._held.get(shard)
        return (
            held is not None
            and (epoch is None or held.epoch == epoch)
            and self._clock() < held.deadline
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Join: schema, lease rows, a check that all replicas agree on the shard count."""
        async with self._io:
            try:
                await self._bounded(self._join())
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._drop_connection()
                raise StateError(f"cannot join the leases: {describe(exc, self._url)}") from exc
        await self.tick()
        self._loop_task = asyncio.create_task(self._run(), name=f"leases-{self.replica_id}")

    async def _join(self) -> None:
        conn = await self._connection()
        await migrate(conn)
        await conn.execute(
            "INSERT INTO leases (shard) SELECT generate_series(0, %s - 1) ON CONFLICT DO NOTHING",
            (self.shards,),
        )
        await conn.execute("DELETE FROM replicas WHERE expires_at < now() - interval '1 hour'")
        cur = await conn.execute(
            "SELECT DISTINCT shards FROM replicas WHERE expires_at > now() AND replica_id <> %s",
            (self.replica_id,),
        )
        others = sorted(r[0] for r in await cur.fetchall())
        if others and others != [self.shards]:
            raise ConfigError(
                f"BRIDGE_SHARDS={self.shards} differs from the running replicas' {others}: "
                "change it only with every replica stopped"
            )

    async def _run(self) -> None:
        while True:
            started = self._clock()
            await self.tick()
            await asyncio.sleep(max(0.0, self.renew_every - (self._clock() - started)))

    async def tick(self) -> None:
        """One round: heartbeat and renew, hand over above the fair share, claim up to it."""
        async with self._io:
            try:
                await self._bounded(self._round())
            except (psycopg.Error, OSError, TimeoutError, StateError) as exc:
                self.failed_rounds += 1
                log.warning("lease round failed", extra={"reason": describe(exc, self._url)})
                await self._drop_connection()
        self._expire()

    async def release_all(self) -> None:
        """Hand every shard over: wait for ``on_lost`` (the page in flight), then release."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        await self._hand_over(set(self._held))
        async with self._io:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError, StateError):
                conn = await self._connection()
                await self._bounded(
                    conn.execute("DELETE FROM replicas WHERE replica_id = %s", (self.replica_id,))
                )
        await self.halt()

    async def halt(self) -> None:
        """Stop renewing and disconnect without handing anything over (what a crash leaves)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._timer is not None:
            self._timer.cancel()
        await self._drop_connection()
        if self._background:
            await asyncio.wait(self._background, timeout=self.ttl + 10)

    # -- one round -----------------------------------------------------------------------

    async def _round(self) -> None:
        conn = await self._connection()
        self._expire()
        mine = sorted(self._held)
        sent = self._clock()
        cur = await conn.execute(
            _RENEW,
            {
                "me": self.replica_id,
                "n": self.shards,
                "ttl": self.ttl,
                "shards": mine,
                "epochs": [self._held[s].epoch for s in mine],
            },
        )
        renewed = {r[0] for r in await cur.fetchall()}
        for shard in mine:
            if shard in renewed:
                self._held[shard].deadline = sent + self.ttl
            else:
                self._lose(shard)
        cur = await conn.execute("SELECT replica_id FROM replicas WHERE expires_at > now()")
        target = fair_share(self.shards, [r[0] for r in await cur.fetchall()], self.replica_id)
        staying = sorted(set(self._held) - self._leaving)
        if len(staying) > target:
            self._spawn(self._hand_over(set(staying[target:])))
        elif len(staying) < target:
            sent = self._clock()
            cur = await conn.execute(
                _CLAIM,
                {
                    "n": self.shards,
                    "mine": sorted(self._held),
                    "me": self.replica_id,
                    "need": target - len(staying),
                    "ttl": self.ttl,
                },
            )
            for shard, epoch in await cur.fetchall():
                self._held[shard] = _Held(epoch, sent + self.ttl)
                log.info("shard gained", extra={"shard": shard, "epoch": epoch})
                if self._on_gained is not None:
                    self._spawn(self._on_gained(shard, epoch))
        self._arm_timer()

    async def _hand_over(self, shards: set[int]) -> None:
        shards = {s for s in shards - self._leaving if s in self._held}
        if not shards:
            return
        self._leaving |= shards
        epochs = {s: self._held[s].epoch for s in shards}
        if self._on_lost is not None:
            # The owner finishes its page in flight; past the deadline the fence stops it anyway.
            left = max(0.01, max(self._held[s].deadline for s in epochs) - self._clock())
            calls = [self._on_lost(s, e) for s, e in epochs.items()]
            try:
                done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), left)
            except TimeoutError:
                done = [TimeoutError("the owner did not finish before the deadline")]
            for error in (d for d in done if isinstance(d, BaseException)):
                log.warning("shard hand-over callback failed", extra={"reason": repr(error)})
        async with self._io:
            try:
                conn = await self._connection()
                await self._bounded(conn.execute(_RELEASE, (self.replica_id, sorted(epochs))))
            except (psycopg.Error, OSError, TimeoutError, StateError) as exc:
                # Not released: the leases lapse after the TTL instead.
                log.warning("shard release failed", extra={"reason": describe(exc, self._url)})
            for shard in epochs:
                self._held.pop(shard, None)
                log.info("shard handed over", extra={"shard": shard})
            self._leaving -= shards

    def _expire(self) -> None:
        now = self._clock()
        for shard in [s for s, h in self._held.items() if h.deadline <= now]:
            if shard not in self._leaving:
                self._lose(shard)

    def _lose(self, shard: int) -> None:
        held = self._held.pop(shard)
        log.warning("shard lost", extra={"shard": shard, "epoch": held.epoch})
        if self._on_lost is not None:
            self._spawn(self._on_lost(shard, held.epoch))

    def _arm_timer(self) -> None:
        # Report a lapse at its deadline even while a round hangs on an unreachable database.
        if self._timer is not None:
            self._timer.cancel()
        if self._held:
            soonest = min(h.deadline for h in self._held.values())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, soonest - self._clock()), self._expire)

    # -- plumbing ------------------------------------------------------------------------

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bounded(self, work: Awaitable[Any]) -> Any:
        """Run ``work`` with ``op_timeout``; on timeout the connection is abandoned, not awaited:
        cancelling a query on a dead link can take psycopg seconds of its own."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=self.op_timeout)
        if not done:
            task.cancel()
            self._spawn(_bury(task, self._conn))
            self._conn = None
            raise TimeoutError(f"the database did not answer within {self.op_timeout:g} s")
        return task.result()

    async def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=max(1, int(self.op_timeout))
                )
            except psycopg.Error as exc:
                raise StateError(describe(exc, self._url)) from exc
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


async def _bury(task: asyncio.Future[Any], conn: Conn | None) -> None:
    """Let an abandoned query finish its own cancellation, then close its connection."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()
