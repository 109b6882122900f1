"""``BRIDGE_AUTH_CONNECTOR``: each bridge drains its own connector's queue and nobody else's.

Bitrix24 reads ``auth_connector`` from the request itself only (next to ``auth``); inside a
``batch`` a command's own ``auth_connector`` is ignored (BITRIX24.md, from the rest module's
``Auth::$authQueryAdditional``; the emulator follows it). A bridge that put the connector
only inside its commands drained the connector-less queue: another integration's events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace


def _events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": f"{prefix}-{n}"}}} for n in range(count)
    ]


async def _queue(portal: Portal, connector: str) -> dict[str, Any]:
    answer = await portal.http.get("/_emulator/queue", params={"connector": connector})
    data: dict[str, Any] = answer.json()
    return data


async def test_each_bridge_touches_only_its_own_connectors_queue(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    await portal.http.post("/_emulator/events", json={"events": _events("other", 120)})
    await portal.http.post(
        "/_emulator/events", json={"events": _events("ours", 130), "connector": "crm"}
    )
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "crm.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_AUTH_CONNECTOR="crm",
        BRIDGE_PAGE_SIZE="20",
    )
    async with bridge_in_process(env):
        await collector.wait_for(130, timeout=60)

        async def crm_drained() -> bool:
            queue = await _queue(portal, "crm")
            return queue["free"] == 0 and not queue["reserved"]

        await until(crm_drained, "the crm connector's queue to drain", timeout=10)
        await collector.settle(quiet=0.5)
        crm = await _queue(portal, "crm")
        other = await _queue(portal, "")
    assert crm == {"free": 0, "reserved": {}, "errors": 0}
    assert other["free"] == 120, "the bridge touched another integration's queue"
    assert other["reserved"] == {}
    bodies = [json.loads(m.body) for m in collector.messages]
    assert sorted(b["EVENT_DATA"]["FIELDS"]["ID"] for b in bodies) == sorted(
        f"ours-{n}" for n in range(130)
    )
    assert {m.headers["x-bitrix24-connector"] for m in collector.messages} == {"crm"}

    # The connector-less bridge, in turn, drains only the other queue.
    env.pop("BRIDGE_AUTH_CONNECTOR")
    env["BRIDGE_STATE_PATH"] = str(tmp_path / "plain.sqlite3")
    env["BRIDGE_REFRESH_TOKEN"] = (await portal.app())["refresh_token"]
    async with bridge_in_process(env):
        await collector.wait_for(250, timeout=60)
        await collector.settle(quiet=0.5)
        other = await _queue(portal, "")
    assert other == {"free": 0, "reserved": {}, "errors": 0}
    later = [json.loads(m.body) for m in collector.messages[130:]]
    assert sorted(b["EVENT_DATA"]["FIELDS"]["ID"] for b in later) == sorted(
        f"other-{n}" for n in range(120)
    )
    assert all("x-bitrix24-connector" not in m.headers for m in collector.messages[130:])
