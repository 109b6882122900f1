"""The whole bridge against the emulator and a real RabbitMQ, over real sockets."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import InProcessBridge, Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds

EVENTS = ["ONCRMLEADADD", "ONCRMLEADUPDATE", "ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMCONTACTADD"]


async def test_5000_events_arrive_exactly_once_with_the_contracted_message(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    server, portal, port = emulated
    collectors = {e: await amqp_ns.consume(amqp_ns.exchange(e.lower())) for e in EVENTS}
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",  # only the notification may trigger this drain
    )
    app = await portal.app()
    async with bridge_in_process(env) as bridge:
        await bridge.service.sessions[app["member_id"]].drainer.idle.wait()
        for index, event in enumerate(EVENTS):
            await portal.generate(event, 1000, start_id=index * 1000 + 1)
        # Adding events sent ONOFFLINEEVENT (minTimeout=0) to the bridge: that alone drains.
        for event in EVENTS:
            await collectors[event].wait_for(1000, timeout=120)
        await portal.wait_empty(timeout=30)
        for collector in collectors.values():
            await collector.settle(quiet=0.5)
        assert bridge.service.state is not None
        journal = await bridge.service.state.journal_all()

    assert journal == []
    for event, collector in collectors.items():
        ids = collector.message_ids
        assert len(ids) == 1000
        assert len(set(ids)) == 1000, f"duplicates for {event}"
        # Per-portal order: IDs increase within an event's exchange.
        event_ids = [int(json.loads(m.body)["ID"]) for m in collector.messages]
        assert event_ids == sorted(event_ids)

    message = collectors["ONCRMDEALADD"].messages[0]
    body = json.loads(message.body)
    assert set(body) == {
        "ID",
        "TIMESTAMP_X",
        "EVENT_NAME",
        "EVENT_DATA",
        "EVENT_ADDITIONAL",
        "MESSAGE_ID",
    }
    assert body["EVENT_NAME"] == "ONCRMDEALADD"
    assert message.body == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.type == "ONCRMDEALADD"
    assert message.app_id == "bitrix24-bridge"
    assert message.message_id == f"{app['member_id']}:{body['ID']}:{body['TIMESTAMP_X']}"
    assert message.timestamp == datetime.fromisoformat(body["TIMESTAMP_X"]).replace(microsecond=0)
    assert message.routing_key == server.domain
    assert message.headers == {
        "x-bitrix24-domain": server.domain,
        "x-bitrix24-member-id": app["member_id"],
        "x-bitrix24-event": "ONCRMDEALADD",
        "x-bitrix24-event-id": str(body["ID"]),
        "x-bitrix24-message-id": body["MESSAGE_ID"],
    }


async def _journal(state_path: Path) -> list[tuple[str, str, str]]:
    from bridge.state import State

    state = await State.open(str(state_path))
    try:
        return await state.journal_all()
    finally:
        await state.close()


async def test_sigkill_at_random_moments_loses_nothing(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    import asyncio

    from tests.harness import BridgeProcess

    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    state_path = tmp_path / "state.sqlite3"
    env = await bridge_env(portal, amqp_ns, state_path, BRIDGE_HTTP_PORT=str(port))
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    total = 10_000  # several seconds of drain, so each kill lands inside it
    kills = 0
    try:
        await portal.generate("ONCRMLEADADD", total)
        for _ in range(4):
            bridge.start()
            await bridge.wait_live()
            # Somewhere inside the drain: before, during or after a page. The random moment
            # is the test's subject, not a wait for something.
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            bridge.kill()
            kills += 1
        bridge.start()
        await bridge.wait_live()
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0, timeout=60)
        bridge.terminate()
    finally:
        bridge.stop()
    ids = collector.message_ids
    unique = set(ids)
    duplicates = len(ids) - len(unique)
    print(f"kills={kills} delivered={len(ids)} unique={len(unique)} duplicates={duplicates}")
    assert len(unique) == total
    assert await _journal(state_path) == []
    assert await portal.is_empty()


async def test_broker_connection_cut_mid_page_loses_nothing(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    amqp_proxy: TcpProxy,
    tmp_path: Path,
) -> None:

    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_AMQP_URL=amqp_proxy.url(amqp_ns.url),
    )
    total = 2000
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        cleared_before_cut: list[int] = []

        def more_links_than(links: int) -> Callable[[], Awaitable[bool]]:
            return holds(lambda: amqp_proxy.accepted > links)

        for round_ in range(3):
            await portal.generate("ONCRMLEADADD", total // 4, start_id=round_ * 1000 + 1)
            # Cut in the middle of a frame, a few pages into the drain; then the publisher
            # connects again.
            links = amqp_proxy.accepted
            amqp_proxy.cut_after(20_000 + round_ * 7_000)
            await until(more_links_than(links), "a cut and a reconnect")
            cleared_before_cut.append(len(collector.message_ids))
        await portal.generate("ONCRMLEADADD", total // 4, start_id=5001)
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0)
        failures = bridge.service.metrics.registry.get_sample_value(
            "bitrix24_bridge_publish_failures_total", {"reason": "connection"}
        )
    ids = set(collector.message_ids)
    assert len(ids) == total
    assert failures, "the cut must have hit a publish"


async def test_broker_nack_keeps_events_reserved_until_accepted(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:

    _server, portal, port = emulated
    exchange = amqp_ns.exchange("oncrmleadadd")
    # A queue that refuses everything: the broker nacks every message routed to it.
    await amqp_ns.declare_queue(
        exchange, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0.5",
        BRIDGE_POISON_ATTEMPTS="1000",  # parking is tested in tests/bitrix24/test_poison*.py
    )
    async with bridge_in_process(env) as bridge:
        await portal.generate("ONCRMLEADADD", 120)
        registry = bridge.service.metrics.registry

        def nacks() -> float:
            labels = {"reason": "nack"}
            return registry.get_sample_value("bitrix24_bridge_publish_failures_total", labels) or 0

        await until(holds(lambda: nacks() >= 50), "50 nacks", timeout=10)
        queue = await portal.queue()
        # Nothing was cleared: every event is still in the portal, reserved or free.
        assert queue["free"] + sum(queue["reserved"].values()) == 120
        cleared = registry.get_sample_value(
            "bitrix24_bridge_events_cleared_total", {"event": "ONCRMLEADADD"}
        )
        assert not cleared
        # Once the refusing queue is gone, the same events are delivered.
        refusing = list(amqp_ns._queues)
        collector = await amqp_ns.consume(exchange)
        channel = await amqp_ns.channel()
        for name in refusing:
            await channel.queue_delete(name)
            amqp_ns._queues.remove(name)
        await portal.wait_empty(timeout=60)
        await collector.settle(quiet=1.0)
    assert len(set(collector.message_ids)) == 120


REFRESHES = "bitrix24_bridge_token_refreshes_total"
EXTRA = 100  # events added with each injected fault


def _sample(bridge: InProcessBridge, name: str, labels: dict[str, str]) -> float:
    value = bridge.service.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_upstream_faults_during_a_drain_lose_nothing(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="bridge")

    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    state_path = tmp_path / "state.sqlite3"
    env = await bridge_env(portal, amqp_ns, state_path, BRIDGE_HTTP_PORT=str(port))
    await portal.faults(latency_ms=3)
    await portal.generate("ONCRMLEADADD", 3000)
    async with bridge_in_process(env) as bridge:
        refreshes = {"outcome": "ok"}

        async def struck() -> bool:
            left = await portal.faults()  # no change: the faults still waiting to strike
            return not left["fail_with"] and not left["drop_next_reservation"]

        in_turn: list[dict[str, Any]] = [
            {"fail": {"event.offline.get": 2}},
            {"fail": {"event.offline.clear": 2}},
            {"fail_with": {"batch": {"error": "QUERY_LIMIT_EXCEEDED", "count": 3}}},
            {"drop_next_reservation": True},
        ]
        for step, faults in enumerate(in_turn):
            await portal.faults(**faults)
            # Fresh events, so there is a reservation and a clear for the fault to strike.
            await portal.generate("ONCRMLEADADD", EXTRA, start_id=20_000 + step * 1000)
            await until(struck, f"{faults} to strike")
        await portal.faults(expire_tokens=True)
        refreshed = holds(lambda: _sample(bridge, REFRESHES, refreshes))
        await until(refreshed, "a refresh of the expired token")
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0)
        assert _sample(bridge, "bitrix24_bridge_token_refreshes_total", refreshes) == 1
        assert bridge.service.state is not None
        journal = await bridge.service.state.journal_all()
    assert journal == []
    assert len(set(collector.message_ids)) == 3000 + 4 * EXTRA
    stats = await portal.stats()
    for code in (
        "INTERNAL_SERVER_ERROR",
        "QUERY_LIMIT_EXCEEDED",
        "expired_token",
    ):
        assert stats["errors"].get(code), f"{code} was never answered: the fault did not fire"
    # The reservation whose answer was lost was found through event.offline.list.
    assert any(r.getMessage() == "orphaned reservations found" for r in caplog.records)

    # The rotated refresh token was stored: a restart (whose bootstrap token is long dead)
    # refreshes from the state file once, and drains again.
    await portal.faults(expire_tokens=True)
    await portal.generate("ONCRMLEADADD", 10, start_id=10_001)
    async with bridge_in_process(env) as bridge:
        await portal.wait_empty(timeout=60)
        await collector.settle(quiet=0.5)
        assert _sample(bridge, "bitrix24_bridge_token_refreshes_total", {"outcome": "ok"}) == 1
    assert len(set(collector.message_ids)) == 3010 + 4 * EXTRA


async def test_forged_and_malformed_notifications_cause_no_rest_call(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    import httpx

    _server, portal, port = emulated
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",
    )
    app = await portal.app()
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:
        await next(iter(bridge.service.sessions.values())).drainer.idle.wait()
        before = await portal.calls()
        member, token = app["member_id"], app["application_token"]
        attempts = [
            (
                f"event=ONOFFLINEEVENT&auth[member_id]={member}&auth[application_token]={'0' * 32}",
                form,
                401,
            ),
            (
                f"event=ONOFFLINEEVENT&auth[member_id]={'f' * 32}&auth[application_token]={token}",
                form,
                401,
            ),
            ("event=ONOFFLINEEVENT", form, 401),
            (f"event=ONAPPUNINSTALL&auth[member_id]={member}&auth[application_token]=x", form, 401),
            ("event=ONCRMLEADADD&auth[member_id]=x", form, 401),
            ("data=1", form, 400),
            ("{", {"content-type": "application/json"}, 400),
            ("event=ONOFFLINEEVENT", {"content-type": "text/xml"}, 415),
            ("a=" + "b" * 70_000, form, 413),
        ]
        for body, headers, status in attempts:
            response = await client.post(bridge.events_url, content=body, headers=headers)
            assert response.status_code == status, body[:60]
            assert token not in response.text
        # A forged install: a refresh token the OAuth server rejects registers nothing.
        forged = (
            f"event=ONAPPINSTALL&auth[member_id]=evil{'0' * 28}&auth[refresh_token]=forged"
            f"&auth[application_token]=evil&auth[client_endpoint]=http://127.0.0.1:1/rest/"
            f"&auth[domain]=evil.example"
        )
        response = await client.post(bridge.events_url, content=forged, headers=form)
        assert response.status_code == 401
        assert list(bridge.service.sessions) == [member]
        assert bridge.service.state is not None
        portals = await bridge.service.state.portals(include_inactive=True)
        assert [p.member_id for p in portals] == [member]
        after = await portal.calls()
    assert after == before  # not one REST call was caused by any of them


async def test_event_nobody_subscribed_to_lands_in_the_unrouted_queue(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env):
        await portal.add([{"event": "ONCRMCOMPANYADD", "data": {"FIELDS": {"ID": "42"}}}])
        await portal.wait_empty(timeout=30)
    unrouted = await amqp_ns.consume_queue(amqp_ns.unrouted_exchange)
    (message,) = await unrouted.wait_for(1, timeout=10)
    assert json.loads(message.body)["EVENT_NAME"] == "ONCRMCOMPANYADD"
    assert message.headers["x-bitrix24-event"] == "ONCRMCOMPANYADD"


async def test_sigterm_during_a_drain_exits_in_bound_and_restart_delivers_the_rest(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    import asyncio
    import time

    from tests.harness import BridgeProcess

    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    # A backlog several times what is reserved ahead (2 batches of 25 pages), so SIGTERM
    # lands while most of it still waits in the portal.
    await portal.faults(latency_ms=5)
    await portal.generate("ONCRMLEADADD", 15000)
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    try:
        bridge.start()
        await bridge.wait_live()
        await collector.wait_for(200, timeout=60)
        started = time.monotonic()
        code = bridge.terminate()
        took = time.monotonic() - started
        assert code == 0, bridge.tail()
        assert took < 25  # the shutdown bound (20 s) plus process teardown
        assert not await portal.is_empty(), "the drain finished before SIGTERM: test proves nothing"
        await portal.faults(latency_ms=0)
        bridge.start()
        await bridge.wait_live()
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0)
        bridge.terminate()
    finally:
        bridge.stop()
    assert len(set(collector.message_ids)) == 15000
    assert await _journal(tmp_path / "state.sqlite3") == []
    del asyncio


async def test_a_flood_of_notifications_costs_a_few_passes(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    import time

    import httpx

    from bridge.bitrix24 import phpquery

    _server, portal, port = emulated
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",
        BRIDGE_RATE_LIMIT="2",
        BRIDGE_RATE_BURST="50",
    )
    app = await portal.app()
    async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:
        drainer = bridge.service.sessions[app["member_id"]].drainer
        await drainer.idle.wait()
        before = await portal.calls()
        started = time.monotonic()
        for _ in range(300):
            form = phpquery.encode(
                {
                    "event": "ONOFFLINEEVENT",
                    "ts": int(time.time()),
                    "auth": {
                        "member_id": app["member_id"],
                        "application_token": app["application_token"],
                    },
                }
            )
            response = await client.post(
                bridge.events_url,
                content=form,
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert response.status_code == 200
        elapsed = time.monotonic() - started
        await drainer.idle.wait()
        passes = drainer.passes - 1
        after = await portal.calls()
    # Same-second notifications are paced by the portal's sustained rate (2/s): at most one
    # pass per 0.5 s of flood, plus one for each new second.
    assert 1 <= passes <= int(elapsed / 0.5) + int(elapsed) + 3
    assert after.get("batch", 0) - before.get("batch", 0) == passes
