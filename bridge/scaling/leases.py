"""Shard ownership in scaled mode: leases in PostgreSQL, renewed together, fenced locally.

Each shard is a row of ``leases`` (holder, epoch, expiry from the database clock). Every
``renew_every`` seconds a replica heartbeats in ``replicas`` and renews all of its leases in one
statement, then evens out: it hands over shards above its fair share and claims free or expired
ones up to it (``FOR UPDATE SKIP LOCKED``; each takeover adds 1 to the epoch). The fair share
is ``bridge.scaling.shards.fair_target``: at most ``ceil(N/R)``, counts within ±1 of each other.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.core.errors import ConfigError, LeaseLost, StateError
from bridge.scaling.fencing import Fence
from bridge.scaling.lease_sql import CLAIM, COUNTS, FREE, RELEASE, RENEW
from bridge.scaling.pg_link import LINK_ERRORS, Conn, PgLink
from bridge.scaling.shards import fair_target
from bridge.state.pg_schema import describe, migrate

log = logging.getLogger(__name__)

ShardEvent = Callable[[int, int], Awaitable[None]]  # (shard, epoch)


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
        self._link = PgLink(url, op_timeout or max(renew_every, ttl / 3))
        self._clock = clock
        self._on_gained, self._on_lost = on_gained, on_lost
        self._held: dict[int, _Held] = {}
        self._leaving: set[int] = set()
        self._io = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self.failed_rounds = 0  # rounds that could not reach the database
        self.last_failure: str | None = None  # why the last round failed; None if it did not

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
                await self._link.run(self._join)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._link.close()
                raise StateError(f"cannot join the leases: {self._describe(exc)}") from exc
        await self.tick()
        self._loop_task = asyncio.create_task(self._run(), name=f"leases-{self.replica_id}")

    async def _join(self, conn: Conn) -> None:
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
                await self._link.run(self._round)
                self.last_failure = None
            except LINK_ERRORS as exc:
                self.failed_rounds += 1
                self.last_failure = self._describe(exc)
                log.warning("lease round failed", extra={"reason": self.last_failure})
        self._expire()

    async def release_all(self) -> None:
        """Hand every shard over: wait for ``on_lost`` (the page in flight), then release."""
        # Rounds go on renewing while the owner finishes, but claim and hand over no more.
        self._closing = True
        await self._hand_over(set(self._held))
        await self._stop_loop()
        async with self._io:
            # Gone from the fair share at once, not after the heartbeat lapses.
            with contextlib.suppress(*LINK_ERRORS):
                await self._link.run(self._leave)
        await self.halt()

    async def _leave(self, conn: Conn) -> None:
        await conn.execute("DELETE FROM replicas WHERE replica_id = %s", (self.replica_id,))

    async def halt(self) -> None:
        """Stop renewing and disconnect without handing anything over (what a crash leaves)."""
        self._closing = True
        await self._stop_loop()
        if self._timer is not None:
            self._timer.cancel()
        await self._link.drain(within=self.ttl + 10)
        await self._link.close()

    async def _stop_loop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- one round -----------------------------------------------------------------------

    async def _round(self, conn: Conn) -> None:
        self._expire()
        mine = sorted(self._held)
        sent = self._clock()
        cur = await conn.execute(
            RENEW,
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
        if self._closing:
            return
        staying = sorted(set(self._held) - self._leaving)
        names = {"n": self.shards, "me": self.replica_id, "mine": sorted(self._held)}
        cur = await conn.execute(COUNTS, names)
        others = {r[0]: int(r[1]) for r in await cur.fetchall()}
        cur = await conn.execute(FREE, names)
        row = await cur.fetchone()
        target = fair_target(self.shards, others, len(staying), int(row[0]) if row else 0)
        if len(staying) > target:
            self._spawn(self._hand_over(set(staying[target:])))
        elif len(staying) < target:
            sent = self._clock()
            cur = await conn.execute(
                CLAIM,
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
                await self._link.run(
                    lambda c: c.execute(RELEASE, (self.replica_id, sorted(epochs)))
                )
            except LINK_ERRORS as exc:
                # Not released: the leases lapse after the TTL instead.
                log.warning("shard release failed", extra={"reason": self._describe(exc)})
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
        self._link.spawn(work)

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._link.url)
