"""Two ``serve`` processes on one PostgreSQL state: bootstrap once, SIGTERM hands over, status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import BridgeProcess, Portal, bridge_env, until
from tests.plugins.broker import AmqpNamespace

EVENT = "ONCRMLEADADD"


async def _ready(process: BridgeProcess) -> bool:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{process.url}/readyz", timeout=2)).status_code == 200


async def test_two_serve_processes_share_a_portal_and_hand_it_over_on_sigterm(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    pg_url: str,
    tmp_path: Path,
) -> None:
    _server, portal, notified_port = emulated
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "unused.sqlite3",
        BRIDGE_STATE_URL=pg_url,
        BRIDGE_SHARDS="1",
        BRIDGE_LEASE_TTL="2",
        BRIDGE_LEASE_RENEW="0.5",
        BRIDGE_POLL_INTERVAL="0",  # only notifications, forwarded or not, wake a drain
    )
    collector = await amqp_ns.consume(amqp_ns.exchange(EVENT.lower()))
    first = BridgeProcess({**env, "BRIDGE_REPLICA_ID": "first"}, tmp_path / "first.log")
    # The portal notifies the second process: it forwards the wake-ups to the first.
    second = BridgeProcess(
        {**env, "BRIDGE_REPLICA_ID": "second", "BRIDGE_HTTP_PORT": str(notified_port)},
        tmp_path / "second.log",
    )
    try:
        first.start()
        await first.wait_live()
        second.start()
        await second.wait_live()
        await until(lambda: _ready(second), "the second process ready")
        await portal.generate(EVENT, 200)
        await collector.wait_for(200, timeout=30)
        assert first.terminate() == 0
        await portal.generate(EVENT, 200, start_id=1001)
        await collector.wait_for(400, timeout=30)
        await portal.wait_empty()
        twice = [m for m, n in Counter(collector.message_ids).items() if n > 1]
        assert twice == []
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "status", "--json", "--offline"],
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        (entry,) = json.loads(status.stdout)["portals"]
        assert entry["status"] == "active"
        assert entry["in_flight"] == []
    finally:
        first.stop()
        second.stop()
    assert not (tmp_path / "unused.sqlite3").exists()
