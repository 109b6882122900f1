"""The whole bridge against the emulator and a real RabbitMQ, over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from bridge.emulator import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, free_port

EVENTS = ["ONCRMLEADADD", "ONCRMLEADUPDATE", "ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMCONTACTADD"]


@pytest.fixture
async def emulated() -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    """An emulated portal whose notifications go to a bridge port chosen in advance."""
    bridge_port = free_port()
    config = EmulatorConfig(
        handler_url=f"http://127.0.0.1:{bridge_port}/bitrix24/events",
        min_timeout=0,
        rate_limit=None,
        auto_bind=True,
    )
    server = EmulatorServer(config).start()
    portal = Portal(server.base_url)
    yield server, portal, bridge_port
    await portal.close()
    server.stop()


async def test_5000_events_arrive_exactly_once_with_the_contracted_message(
    emulated, amqp_ns, tmp_path: Path
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
