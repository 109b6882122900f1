"""What /metrics tells an operator about the portal's queue and the drain."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client import generate_latest

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.metrics import Metrics
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace

OLDEST = "bitrix24_bridge_oldest_pending_event_timestamp_seconds"
DEPTH = "bitrix24_bridge_upstream_queue_depth"


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_queue_depth_and_oldest_event_come_from_the_portal(
    amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    server = EmulatorServer(EmulatorConfig(rate_limit=None, auto_bind=True)).start()
    portal = Portal(server.base_url)
    try:
        # Every message is refused, so the events stay in the portal's queue.
        refusing = await amqp_ns.declare_queue(
            amqp_ns.exchange("oncrmleadadd"),
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await portal.generate("ONCRMLEADADD", 30)
        await portal.http.post("/_emulator/clock", json={"advance": 120})
        env = await bridge_env(portal, amqp_ns, tmp_path / "s.sqlite3", BRIDGE_POLL_INTERVAL="0.3")
        async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:

            async def observed() -> bool:
                text = (await client.get(bridge.url + "/metrics")).text
                nacks = _value(text, 'bitrix24_bridge_publish_failures_total{reason="nack"}')
                return None not in (_value(text, DEPTH), _value(text, OLDEST)) and bool(nacks)

            await until(observed, "depth, oldest event and a nack in /metrics", timeout=10)
            text = (await client.get(bridge.url + "/metrics")).text
            depth, oldest = _value(text, DEPTH), _value(text, OLDEST)
            observed_at = time.time()
            broker = _value(text, "bitrix24_bridge_broker_connected")
            inflight = _value(text, "bitrix24_bridge_inflight_reservations")

            # The consumer goes away: the events drain (into the unrouted queue), and the
            # oldest-event series goes with them, so an alert on it clears.
            channel = await amqp_ns.channel()
            await channel.queue_delete(refusing)
            await portal.wait_empty(timeout=60)

            async def gone() -> bool:
                after = (await client.get(bridge.url + "/metrics")).text
                return (
                    _value(after, "bitrix24_bridge_upstream_queue_depth") == 0
                    and _value(after, OLDEST) is None
                )

            await until(gone, "the oldest-event series to go once the queue is empty")
    finally:
        await portal.close()
        server.stop()
    assert depth == 30
    assert oldest is not None
    # A timestamp on this machine's clock, at least the 120 s the portal's clock moved ago.
    assert observed_at - oldest >= 120
    assert broker == 1
    assert inflight is not None
    assert f'portal="{server.domain}"' in text


def test_alerting_counters_start_at_zero() -> None:
    # increase() sees nothing on a series born at 1: the first invalid_grant or failed pass
    # would go unnoticed, so these series exist at 0 before anything happens.
    metrics = Metrics()
    metrics.add_portal("acme.bitrix24.ru")
    text = generate_latest(metrics.registry).decode()
    for sample in (
        'bitrix24_bridge_token_refreshes_total{outcome="failed"} 0.0',
        'bitrix24_bridge_token_refreshes_total{outcome="ok"} 0.0',
        'bitrix24_bridge_drain_passes_total{outcome="failed",portal="acme.bitrix24.ru"} 0.0',
        'bitrix24_bridge_drain_passes_total{outcome="ok",portal="acme.bitrix24.ru"} 0.0',
        'bitrix24_bridge_drain_passes_total{outcome="stopped",portal="acme.bitrix24.ru"} 0.0',
        'bitrix24_bridge_publish_failures_total{reason="nack"} 0.0',
        'bitrix24_bridge_portal_stopped{portal="acme.bitrix24.ru"} 0.0',
    ):
        assert sample in text, sample
