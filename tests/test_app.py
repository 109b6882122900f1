"""``/readyz``: ready means this process can take notifications and publish (broker connection
open and heard from, state file writable). Portal health is detail in the body, in
``/metrics`` and in ``status``, never a reason to take the pod out of service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from yarl import URL

from bridge.amqp.publisher import HEARTBEAT, with_heartbeat
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace
from tests.plugins.tcpproxy import TcpProxy
from tests.test_cli import run as run_cli

# The bound the readiness promise names, and a generous limit to wait for it: the heartbeat
# must notice a silent broker well within it; without one (aiormq's default of 60 s) the
# connection would look open for about three minutes.
SILENCE_BOUND = 30
WAIT_LIMIT = 60


def bare_env(amqp_ns: AmqpNamespace, tmp_path: Path, amqp_url: str | None = None) -> dict[str, str]:
    """A bridge with no portal at all: a fresh install waiting for ONAPPINSTALL."""
    return {
        "BRIDGE_CLIENT_ID": "app.test",
        "BRIDGE_CLIENT_SECRET": "secret.test",
        "BRIDGE_AMQP_URL": amqp_url or amqp_ns.url,
        "BRIDGE_EXCHANGE_TEMPLATE": amqp_ns.exchange_template,
        "BRIDGE_UNROUTED_EXCHANGE": amqp_ns.unrouted_exchange,
        "BRIDGE_STATE_PATH": str(tmp_path / "state.sqlite3"),
        "BRIDGE_POLL_INTERVAL": "0",
        "BRIDGE_LOG_FORMAT": "text",
    }


@pytest.fixture
async def refusing_portal() -> AsyncIterator[Portal]:
    # A portal without rest_offline_extended answers every reservation with WRONG_LICENSE: a
    # configuration error that stops its drain.
    server = EmulatorServer(
        EmulatorConfig(rate_limit=None, auto_bind=True, offline_extended=False)
    ).start()
    portal = Portal(server.base_url)
    try:
        yield portal
    finally:
        await portal.close()
        server.stop()


async def test_a_fresh_install_is_ready_before_any_portal(
    amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    async with bridge_in_process(bare_env(amqp_ns, tmp_path)) as bridge, httpx.AsyncClient() as c:
        answer = await c.get(bridge.url + "/readyz")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"status": "ready", "portals": []}


async def test_a_stopped_portal_is_reported_not_unready(
    refusing_portal: Portal, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    env = await bridge_env(
        refusing_portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_POLL_INTERVAL="1"
    )
    app = await refusing_portal.app()
    await refusing_portal.generate("ONCRMLEADADD", 3)
    async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:

        async def stopped() -> bool:
            body = (await client.get(bridge.url + "/readyz")).json()
            return bool(body["portals"]) and body["portals"][0]["state"] == "stopped"

        await until(stopped, "the portal's drain to stop")
        answer = await client.get(bridge.url + "/readyz")
        assert answer.status_code == 200
        (portal,) = answer.json()["portals"]
        assert portal["portal"] == app["domain"]
        assert "WRONG_LICENSE" in portal["reason"]
        metrics = (await client.get(bridge.url + "/metrics")).text
        assert f'bitrix24_bridge_portal_stopped{{portal="{app["domain"]}"}} 1.0' in metrics

        # `status`, another process, says why while serve runs.
        async def status_says_why() -> bool:
            proc = await asyncio.to_thread(run_cli, env, "status", "--offline")
            return "drain stopped: " in proc.stdout and "WRONG_LICENSE" in proc.stdout

        await until(status_says_why, "status to report the stopped drain")
    assert (await refusing_portal.queue())["free"] == 3  # nothing taken, nothing lost


async def test_a_silent_broker_makes_the_pod_unready_within_the_bound(
    amqp_ns: AmqpNamespace, amqp_proxy: TcpProxy, tmp_path: Path
) -> None:
    env = bare_env(amqp_ns, tmp_path, amqp_url=amqp_proxy.url(amqp_ns.url))
    async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:

        async def status() -> int:
            return (await client.get(bridge.url + "/readyz")).status_code

        assert await status() == 200
        # A partition: the socket stays open, no byte moves in either direction.
        amqp_proxy.pause()

        async def unready() -> bool:
            return await status() == 503

        await until(unready, "/readyz to notice the silent broker", timeout=WAIT_LIMIT)
        body = (await client.get(bridge.url + "/readyz")).json()
        assert "broker" in body["reason"]
        metrics = (await client.get(bridge.url + "/metrics")).text
        assert "bitrix24_bridge_broker_connected 0.0" in metrics

        amqp_proxy.resume()

        async def ready() -> bool:
            return await status() == 200

        await until(ready, "/readyz to recover after the partition", timeout=90)


def test_the_heartbeat_is_set_unless_the_url_sets_one() -> None:
    # aiormq reads the heartbeat from the URL's query (aiormq/connection.py, mosquito/aiormq:
    # `self.url.query.get("heartbeat", "60")`) and declares the link dead after
    # (heartbeat + 1) * 3 s without a frame: 18 s with ours, inside the 30 s bound.
    assert (HEARTBEAT + 1) * 3 + HEARTBEAT / 2 < SILENCE_BOUND
    url = "amqp://bridge:p%40ss@rabbit.example:5672/%2Fcrm"
    with_hb = URL(with_heartbeat(url))
    assert with_hb.query["heartbeat"] == str(HEARTBEAT)
    assert with_hb.password == "p@ss"
    assert with_hb.raw_path == "/%2Fcrm"
    explicit = url + "?heartbeat=2"
    assert with_heartbeat(explicit) == explicit
