"""Diadoc boxes in scaled mode: two replicas on one PostgreSQL state share the boxes by shard.

Real PostgreSQL, real RabbitMQ, the Diadoc emulator (its refresh tokens rotate: one presented
twice is refused and counted). Leases are short (TTL 2 s, renewed every 0.5 s) over 4 shards.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from urllib.parse import parse_qs

from bridge.diadoc.sharded import ShardedDiadoc
from bridge.emulators.diadoc import DiadocEmulator, DiadocEmulatorServer
from bridge.scaling.shards import shard_of
from tests.harness import until
from tests.plugins.broker import AmqpNamespace
from tests.scaling.cluster import SHARDS, Replica, emulated_portals, replica, replica_env
from tests.waiting import holds

BOXES = ("box-1", "box-2", "box-4")  # shards 0, 2 and 3 of 4


def _group(r: Replica) -> ShardedDiadoc:
    (group,) = [g for g in r.service.groups if isinstance(g, ShardedDiadoc)]
    return group


def _shards_held(r: Replica) -> int:
    ownership = r.service.ownership
    assert ownership is not None
    return len(ownership.leases.owned())


def _held_boxes(r: Replica) -> set[str]:
    return {b for b in BOXES if r.owns(b)}


def _drains_its_boxes(r: Replica) -> bool:
    return set(_group(r).boxes()) == _held_boxes(r)


def _read_boxes(r: Replica, host: str) -> set[str]:
    """The boxes whose feed this replica read since its recorder was cleared."""
    return {
        parse_qs(s.query)["boxId"][0]
        for s in r.recorder.sent
        if s.host == host and "GetDocflowEvents" in s.path
    }


def _once(keys: list[str | None], expected: set[str]) -> None:
    twice = [k for k, n in Counter(keys).items() if n > 1]
    assert not twice, f"{len(twice)} Diadoc events published more than once"
    assert set(keys) == expected


async def test_boxes_are_drained_by_their_shard_holder_and_taken_over(
    pg_url: str, amqp_ns: AmqpNamespace
) -> None:
    assert sorted(shard_of(b, SHARDS) for b in BOXES) == [0, 2, 3]
    model = DiadocEmulator(BOXES)
    exchange = f"{amqp_ns.prefix}.diadoc.events"
    with DiadocEmulatorServer(model) as diadoc:
        host = f"{diadoc.host}:{diadoc.port}"
        extra = {
            **diadoc.env(),
            "BRIDGE_DIADOC_EXCHANGE": exchange,
            "BRIDGE_DIADOC_POLL_INTERVAL": "0.2",
        }
        collector = await amqp_ns.consume(exchange)
        async with emulated_portals(1) as portals, contextlib.AsyncExitStack() as stack:
            env_a = await replica_env("a", pg_url, amqp_ns, portals[0], **extra)
            env_b = await replica_env("b", pg_url, amqp_ns, portals[0], **extra)
            a = await stack.enter_async_context(replica("a", env_a))
            async with replica("b", env_b) as b:
                await until(
                    holds(lambda: [_shards_held(r) for r in (a, b)] == [2, 2]),
                    "the shards shared out",
                )
                await until(
                    holds(lambda: all(_drains_its_boxes(r) for r in (a, b))),
                    "each replica draining the boxes of its shards",
                )
                for r in (a, b):
                    r.recorder.sent.clear()
                added = [e.key for box in BOXES for e in model.add_events(box, count=15)]
                await collector.wait_for(len(added), timeout=30)
                for r in (a, b):
                    # Each box read only by the holder of its shard.
                    assert _read_boxes(r, host) <= _held_boxes(r)
                assert _read_boxes(a, host) | _read_boxes(b, host) == set(BOXES)
                assert _held_boxes(a)
                assert _held_boxes(b)
                # The replica that closes hands its boxes over: the other one drains them.
                await stack.aclose()
                await until(
                    holds(lambda: set(_group(b).boxes()) == set(BOXES)), "the boxes taken over"
                )
                added += [e.key for box in BOXES for e in model.add_events(box, count=10)]
                await collector.wait_for(len(added), timeout=30)
                # A replica that joins gets its share handed over by a running one.
                env_c = await replica_env("c", pg_url, amqp_ns, portals[0], **extra)
                async with replica("c", env_c) as c:
                    await until(
                        holds(lambda: [_shards_held(r) for r in (b, c)] == [2, 2]),
                        "the shards shared out again",
                    )
                    await until(
                        holds(lambda: all(_drains_its_boxes(r) for r in (b, c))),
                        "each replica draining the boxes of its shards again",
                    )
                    for r in (b, c):
                        r.recorder.sent.clear()
                    added += [e.key for box in BOXES for e in model.add_events(box, count=5)]
                    await collector.wait_for(len(added), timeout=30)
                    for r in (b, c):
                        assert _read_boxes(r, host) <= _held_boxes(r)
        _once(collector.message_ids, set(added))
        # One OpenID session shared by both replicas: no refresh token presented twice.
        assert model.refreshes >= 1
        assert model.refused_refreshes == 0


async def test_a_crashed_replicas_boxes_are_taken_over_and_no_event_is_lost(
    pg_url: str, amqp_ns: AmqpNamespace
) -> None:
    model = DiadocEmulator(BOXES)
    model.latency_ms = 20
    added = [e.key for box in BOXES for e in model.add_events(box, count=100)]
    exchange = f"{amqp_ns.prefix}.diadoc.events"
    with DiadocEmulatorServer(model) as diadoc:
        # One shard: active and standby; small pages, so the crash cuts a drain short.
        extra = {
            **diadoc.env(),
            "BRIDGE_DIADOC_EXCHANGE": exchange,
            "BRIDGE_DIADOC_POLL_INTERVAL": "0.2",
            "BRIDGE_DIADOC_PAGE_LIMIT": "5",
            "BRIDGE_SHARDS": "1",
        }
        collector = await amqp_ns.consume(exchange)
        async with emulated_portals(1) as portals, contextlib.AsyncExitStack() as first:
            env_a = await replica_env("a", pg_url, amqp_ns, portals[0], **extra)
            env_b = await replica_env("b", pg_url, amqp_ns, portals[0], **extra)
            a = await first.enter_async_context(replica("a", env_a))
            await until(holds(lambda: _shards_held(a) == 1), "the first replica active")
            async with replica("b", env_b) as b:
                await until(holds(lambda: len(collector.messages) >= 60), "a drain under way")
                # A crash: the lease is neither renewed nor released, the drains cut short.
                ownership = a.service.ownership
                assert ownership is not None
                await ownership.halt()
                for drainer in a.service.drainers():
                    await drainer.stop(0)
                assert len(collector.messages) < len(added)
                await until(holds(lambda: _shards_held(b) == 1), "the standby taking over")
                await collector.wait_for(len(added), timeout=60)
                assert set(_group(b).boxes()) == set(BOXES)
        # Nothing lost (a crash may publish the page it cut short twice, never more).
        assert set(collector.message_ids) == set(added)
        assert len(collector.message_ids) - len(added) <= 5 * len(BOXES)  # a page per box
        assert model.refused_refreshes == 0
