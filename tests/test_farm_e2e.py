"""The bridge against a farm of emulated portals: each installs, each one's events arrive."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.harness import bridge_in_process, free_port, until
from tests.plugins.broker import AmqpNamespace

PORTALS = 3
EVENTS_EACH = 200


async def test_every_event_of_every_portal_of_a_farm_arrives_and_is_cleared(
    amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    bridge_port = free_port()
    config = EmulatorConfig(
        handler_url=f"http://127.0.0.1:{bridge_port}/bitrix24/events",
        min_timeout=0,
        rate_limit=None,
        auto_bind=True,
    )
    farm = EmulatorServer(config, portals=PORTALS).start()
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    try:
        async with httpx.AsyncClient(base_url=f"{farm.base_url}/_farm", timeout=30) as control:

            async def get(path: str) -> Any:
                return (await control.get(path)).raise_for_status().json()

            listed = await get("/portals")
            env = {
                "BRIDGE_AMQP_URL": amqp_ns.url,
                "BRIDGE_EXCHANGE_TEMPLATE": amqp_ns.exchange_template,
                "BRIDGE_UNROUTED_EXCHANGE": amqp_ns.unrouted_exchange,
                "BRIDGE_CLIENT_ID": listed["client_id"],
                "BRIDGE_CLIENT_SECRET": listed["client_secret"],
                "BRIDGE_OAUTH_URL": listed["oauth_url"],
                "BRIDGE_STATE_PATH": str(tmp_path / "state.sqlite3"),
                "BRIDGE_HTTP_PORT": str(bridge_port),
                "BRIDGE_POLL_INTERVAL": "2",
                "BRIDGE_RATE_LIMIT": "500",
                "BRIDGE_RATE_BURST": "500",
                "BRIDGE_LOG_FORMAT": "text",
            }
            members = {p["member_id"]: p["domain"] for p in listed["portals"]}
            async with bridge_in_process(env) as bridge:
                installed = (await control.post("/install", json={})).raise_for_status().json()
                assert [i["status"] for i in installed["installed"]] == [200] * PORTALS
                assert set(bridge.service.sessions) == set(members)
                body = {"generate": {"event": "ONCRMLEADADD", "count": EVENTS_EACH}}
                (await control.post("/events", json=body)).raise_for_status()
                await collector.wait_for(PORTALS * EVENTS_EACH, timeout=120)

                async def all_cleared() -> bool:
                    queues = await get("/queues")
                    return all(q["cleared"] == EVENTS_EACH for q in queues.values())

                await until(all_cleared, "every portal's events cleared", timeout=30)
                queues = await get("/queues")
                stats = await get("/stats")
                await collector.settle(quiet=0.5)
            calls = await get("/calls?since=0&limit=10000")
    finally:
        farm.stop()

    for queue in queues.values():
        assert (queue["free"], queue["reserved"], queue["errors"]) == (0, 0, 0)
    # Each portal's events, once each, under its own member_id and its own domain.
    per_portal = Counter(m.headers["x-bitrix24-member-id"] for m in collector.messages)
    assert per_portal == {member: EVENTS_EACH for member in members}
    assert len(set(collector.message_ids)) == PORTALS * EVENTS_EACH
    for message in collector.messages:
        assert (
            message.headers["x-bitrix24-domain"]
            == members[str(message.headers["x-bitrix24-member-id"])]
        )
        assert message.routing_key == message.headers["x-bitrix24-domain"]
    ids = Counter(json.loads(m.body)["ID"] for m in collector.messages)
    assert set(ids.values()) == {PORTALS}  # the same IDs on each portal, kept apart
    assert stats["totals"]["invalid_grant"] == 0
    assert stats["totals"]["rate_limited"] == 0
    # Every portal was called, and the log names who each call was for.
    logged = Counter(c["member_id"] for c in calls["calls"] if c["kind"] == "rest")
    assert set(logged) == set(members)
    oauth = [c for c in calls["calls"] if c["kind"] == "oauth"]
    assert {c["member_id"] for c in oauth} == set(members)
    assert all(c["outcome"] == "ok" for c in oauth)
