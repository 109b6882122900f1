"""Shard leases against the real PostgreSQL: several LeaseManagers in one process are replicas.

TTLs are short (1-2 s) and every wait is on a condition; what is asserted is the order of
decisions (a replica has stopped before another takes over), never how fast anything was.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypedDict, Unpack

import psycopg
import pytest

from bridge.core.errors import ConfigError, LeaseLost
from bridge.scaling.leases import LeaseManager
from tests.harness import until
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds


class LeaseOptions(TypedDict, total=False):
    shards: int
    ttl: float
    renew_every: float
    op_timeout: float | None


class Replica:
    """A LeaseManager with a log of what it gained and lost."""

    def __init__(self, url: str, name: str, **options: Unpack[LeaseOptions]) -> None:
        self.gained: list[tuple[int, int]] = []
        self.lost: list[tuple[int, int]] = []
        self.on_gained_checks: list[Callable[[int, int], None]] = []
        self.on_lost_checks: list[Callable[[int, int], object]] = []
        self.manager = LeaseManager(
            url,
            f"{name}-{uuid.uuid4().hex[:6]}",
            on_gained=self._gained,
            on_lost=self._lost,
            **options,
        )

    async def _gained(self, shard: int, epoch: int) -> None:
        for check in self.on_gained_checks:
            check(shard, epoch)
        self.gained.append((shard, epoch))

    async def _lost(self, shard: int, epoch: int) -> None:
        for check in self.on_lost_checks:
            result = check(shard, epoch)
            if asyncio.iscoroutine(result):
                await result
        self.lost.append((shard, epoch))

    def count(self) -> int:
        return len(self.manager.owned())


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, url: str = pg_url, **options: Unpack[LeaseOptions]) -> Replica:
        replica = Replica(url, name, **options)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.manager.halt()


async def holders(url: str) -> dict[int, tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT shard, holder, epoch FROM leases WHERE expires_at > now() ORDER BY shard"
        )
        return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}


FAST: LeaseOptions = {"ttl": 1.5, "renew_every": 0.2}


async def test_a_lone_replica_holds_every_shard_at_epoch_one(
    replicas: Callable[..., Replica], pg_url: str
) -> None:
    a = replicas("a", shards=4, **FAST)
    await a.manager.start()
    assert a.manager.owned() == {0: 1, 1: 1, 2: 1, 3: 1}
    await until(holds(lambda: len(a.gained) == 4), "gained events")
    assert sorted(a.gained) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert await holders(pg_url) == {s: (a.manager.replica_id, 1) for s in range(4)}
    fence = a.manager.fence(2)
    assert (fence.shard, fence.epoch, fence.valid) == (2, 1, True)
    with pytest.raises(LeaseLost):
        a.manager.fence(7)


async def test_replicas_must_agree_on_the_shard_count(
    replicas: Callable[..., Replica],
) -> None:
    a = replicas("a", shards=4, **FAST)
    await a.manager.start()
    b = replicas("b", shards=8, **FAST)
    with pytest.raises(ConfigError, match="BRIDGE_SHARDS=8"):
        await b.manager.start()
    assert b.manager.owned() == {}


async def test_shards_even_out_within_one_when_replicas_join(
    replicas: Callable[..., Replica], pg_url: str
) -> None:
    a, b, c = (replicas(n, shards=8, **FAST) for n in ("a", "b", "c"))
    await a.manager.start()
    await b.manager.start()
    await until(holds(lambda: (a.count(), b.count()) == (4, 4)), "4/4 between two replicas")
    await c.manager.start()

    def counts() -> list[int]:
        return sorted(r.count() for r in (a, b, c))

    await until(holds(lambda: counts() == [2, 3, 3]), "2/3/3 over three")
    # No shard is held twice, locally or in the database.
    owned = [set(r.manager.owned()) for r in (a, b, c)]
    assert set.union(*owned) == set(range(8))
    assert sum(len(o) for o in owned) == 8
    in_db = await holders(pg_url)
    for replica, shards in zip((a, b, c), owned, strict=True):
        assert {s for s, (h, _) in in_db.items() if h == replica.manager.replica_id} >= shards
    # Every handed-over shard went through its owner's on_lost before the new owner gained it.
    moved = [s for s, _ in c.gained]
    assert all(any(s == lost for lost, _ in a.lost + b.lost) for s in moved)


async def test_a_killed_replica_is_taken_over_after_the_ttl_with_the_next_epoch(
    replicas: Callable[..., Replica],
) -> None:
    a = replicas("a", shards=2, **FAST)
    b = replicas("b", shards=2, **FAST)
    await a.manager.start()
    await b.manager.start()
    await until(holds(lambda: (a.count(), b.count()) == (1, 1)), "1/1")
    ((shard, epoch),) = a.manager.owned().items()
    deadline = a.manager.deadline(shard)
    assert deadline is not None

    # The new owner may only start once the old one has fenced itself.
    seen: list[tuple[bool, bool]] = []
    b.on_gained_checks.append(
        lambda s, e: seen.append((a.manager.owns(s), time.monotonic() >= deadline))
    )
    await a.manager.halt()  # no release, no more renewals: what SIGKILL leaves behind
    await until(holds(lambda: bool(seen)), "takeover by b")  # seen once b's on_gained ran
    assert b.manager.owned()[shard] == epoch + 1
    assert seen == [(False, True)]


async def test_graceful_hand_over_is_immediate_and_waits_for_the_page_in_flight(
    replicas: Callable[..., Replica], pg_url: str
) -> None:
    # A TTL far longer than the waits below: b can only get the shards through a release.
    slow = {"ttl": 60.0, "renew_every": 0.2}
    a = replicas("a", shards=4, **slow)
    b = replicas("b", shards=4, **slow)
    await a.manager.start()
    held_at_callback: list[str] = []

    async def finish_page(shard: int, epoch: int) -> None:
        # The owner finishes its page: the lease is still a's while it does.
        held_at_callback.append((await holders(pg_url))[shard][0])

    a.on_lost_checks.append(finish_page)
    await b.manager.start()
    await until(holds(lambda: (a.count(), b.count()) == (2, 2)), "2/2 after a hand-over")
    before = dict(a.manager.owned())
    await a.manager.release_all()
    await until(holds(lambda: b.count() == 4), "b holds everything", timeout=20)
    for shard, epoch in before.items():
        assert b.manager.owned()[shard] == epoch + 1
    assert held_at_callback == [a.manager.replica_id] * 4
    assert a.manager.owned() == {}


async def test_a_partitioned_replica_fences_itself_before_anyone_takes_over(
    replicas: Callable[..., Replica], pg_url: str
) -> None:
    async with TcpProxy(target_port=5432) as proxy:
        a = replicas("a", proxy.url(pg_url), shards=1, ttl=2.0, renew_every=0.2)
        b = replicas("b", shards=1, ttl=2.0, renew_every=0.2)
        await a.manager.start()
        await b.manager.start()
        assert (a.count(), b.count()) == (1, 0)
        fence = a.manager.fence(0)
        deadline = a.manager.deadline(0)
        assert deadline is not None

        at_takeover: list[tuple[bool, bool]] = []
        b.on_gained_checks.append(lambda s, e: at_takeover.append((a.manager.owns(s), fence.valid)))
        proxy.pause()
        # Every observation after the deadline says "not mine", whatever the database said last.
        observed: list[tuple[bool, bool]] = []

        def observe() -> bool:
            observed.append((time.monotonic() >= deadline, a.manager.owns(0)))
            return bool(at_takeover)  # b's on_gained has run

        await until(holds(observe), "takeover by b")
        assert a.manager.failed_rounds >= 1
        assert not any(past and owns for past, owns in observed)
        assert at_takeover == [(False, False)]
        assert b.manager.owned() == {0: 2}
        proxy.resume()
        # Back from the partition (a round begun during it may still fail), a does not take the
        # shard back from a fair holder.
        await until(holds(lambda: a.manager.last_failure is None), "a round through again")
        await a.manager.tick()
        assert a.manager.last_failure is None
        assert (a.count(), b.count()) == (0, 1)
