"""What /metrics tells an operator about the portal's queue and the drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from bridge.emulator import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_queue_depth_and_oldest_age_come_from_the_portal(amqp_ns, tmp_path: Path) -> None:
    server = EmulatorServer(EmulatorConfig(rate_limit=None, auto_bind=True)).start()
    portal = Portal(server.base_url)
    try:
        # Every message is refused, so the events stay in the portal's queue.
        await amqp_ns.declare_queue(
            amqp_ns.exchange("oncrmleadadd"),
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await portal.generate("ONCRMLEADADD", 30)
        await portal.http.post("/_emulator/clock", json={"advance": 120})
        env = await bridge_env(portal, amqp_ns, tmp_path / "s.sqlite3", BRIDGE_POLL_INTERVAL="0.3")
        async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:
            depth = age = None
            for _ in range(100):
                text = (await client.get(bridge.url + "/metrics")).text
                depth = _value(text, "bitrix24_bridge_upstream_queue_depth")
                age = _value(text, "bitrix24_bridge_oldest_pending_event_age_seconds")
                nacks = _value(text, 'bitrix24_bridge_publish_failures_total{reason="nack"}')
                if depth is not None and age is not None and nacks:
                    break
                await asyncio.sleep(0.1)
            broker = _value(text, "bitrix24_bridge_broker_connected")
            inflight = _value(text, "bitrix24_bridge_inflight_reservations")
    finally:
        await portal.close()
        server.stop()
    assert depth == 30
    assert age is not None
    assert age >= 120
    assert broker == 1
    assert inflight is not None
    assert f'portal="{server.domain}"' in text
