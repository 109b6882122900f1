"""Scaled mode in the running service: shards held, the groups draining them, wake-ups.

A :class:`~bridge.scaling.leases.LeaseManager` decides which shards this replica holds; on
each shard gained every sharded group starts draining what hashes into it (each drainer's first
pass is the full recovery: journal, then orphan scan), on each shard lost or handed over it
stops them (the page in flight finishes within what is left of the lease). Every lease round
the groups look at the state again for portals installed or uninstalled elsewhere. A
:class:`~bridge.scaling.wakeups.WakeupListener` hears the wake-ups other replicas forward and
hands them to the groups; :meth:`Ownership.forward` sends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import psycopg

from bridge.core.errors import BridgeError, LeaseLost
from bridge.metrics import Metrics
from bridge.scaling.fencing import Fence
from bridge.scaling.leases import LeaseManager
from bridge.scaling.wakeups import Wakeup, WakeupListener, forward
from bridge.settings import Settings
from bridge.state.pg import PgState

log = logging.getLogger(__name__)

STOP_MARGIN = 0.25  # seconds of a lease left unused when a shard is handed over


class Sharded(Protocol):
    """A source group that drains only what hashes into the shards this replica holds."""

    async def gain(self, fence: Fence) -> None: ...

    async def lose(self, shard: int, epoch: int, grace: float) -> None: ...

    async def discover(self) -> None: ...

    def woken(self, member_id: str, ts: float | None) -> None: ...

    def tick_all(self) -> None: ...


class Ownership:
    def __init__(
        self,
        settings: Settings,
        state: PgState,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.state_url is not None
        url = settings.state_url.get_secret_value()
        self.replica_id = settings.replica_name
        self.state = state
        self.groups: list[Sharded] = []
        self._metrics = metrics
        self._clock = clock
        self._every = settings.lease_renew
        self.leases = LeaseManager(
            url,
            self.replica_id,
            shards=settings.shards,
            ttl=settings.lease_ttl,
            renew_every=settings.lease_renew,
            on_gained=self._gained,
            on_lost=self._lost,
            clock=clock,
        )
        self.listener = WakeupListener(url, self._woken, on_gap=self._gap)
        self._locks: dict[int, asyncio.Lock] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._failures_seen = 0
        self.forwarded = 0
        metrics.shards_held.set_function(lambda: len(self.leases.owned()))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for wake-ups, join the leases (the first round claims a fair share)."""
        await self.listener.start()
        await self.leases.start()
        self._watcher = asyncio.create_task(self._watch(), name="ownership")

    async def stop(self) -> None:
        """Hand every shard over, each after its page in flight, then leave."""
        await self._stop_watching()
        await self.leases.release_all()
        await self.listener.stop()

    async def halt(self) -> None:
        """Stop without handing anything over (the leases lapse, as after a crash)."""
        await self._stop_watching()
        await self.leases.halt()
        await self.listener.stop()

    async def _stop_watching(self) -> None:
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            failed = self.leases.failed_rounds
            if failed > self._failures_seen:
                self._metrics.lease_renew_failures.inc(failed - self._failures_seen)
                self._failures_seen = failed
            for group in self.groups:
                try:
                    # Bounded: a database that stops answering must not stall the counting.
                    async with asyncio.timeout(self._every * 4):
                        await group.discover()
                except (BridgeError, TimeoutError) as exc:
                    log.warning("portals unreadable; next round", extra={"reason": repr(exc)})

    def problem(self) -> str | None:
        """Why this replica cannot hold shards now (for readiness); None when it can."""
        failure = self.leases.last_failure
        return None if failure is None else f"shard leases cannot be renewed: {failure}"

    # -- shards ----------------------------------------------------------------------------

    def _lock(self, shard: int) -> asyncio.Lock:
        # A shard's gains and losses run one at a time, in the order the leases report them.
        return self._locks.setdefault(shard, asyncio.Lock())

    async def _gained(self, shard: int, epoch: int) -> None:
        async with self._lock(shard):
            try:
                fence = self.leases.fence(shard)
            except LeaseLost:
                return  # lost again already
            if fence.epoch != epoch:
                return
            for group in self.groups:
                await group.gain(fence)

    async def _lost(self, shard: int, epoch: int) -> None:
        async with self._lock(shard):
            deadline = self.leases.deadline(shard)
            left = 0.0 if deadline is None else deadline - self._clock() - STOP_MARGIN
            for group in self.groups:
                await group.lose(shard, epoch, max(0.1, left))

    # -- wake-ups --------------------------------------------------------------------------

    async def forward(self, member_id: str, ts: float | None) -> None:
        """Send a wake-up to the replica that drains ``member_id`` (whichever that is)."""
        try:
            async with self.state.pool.connection() as conn:
                await forward(conn, Wakeup(member_id, ts))
        except (psycopg.Error, ValueError) as exc:
            # The owner's safety poll (BRIDGE_POLL_INTERVAL) drains it anyway.
            log.warning("wake-up not forwarded", extra={"reason": type(exc).__name__})
            return
        self.forwarded += 1

    def _woken(self, wakeup: Wakeup) -> None:
        for group in self.groups:
            group.woken(wakeup.member_id, wakeup.ts)

    def _gap(self) -> None:
        # Wake-ups sent while the listener was away are lost: a pass over everything held.
        for group in self.groups:
            group.tick_all()
