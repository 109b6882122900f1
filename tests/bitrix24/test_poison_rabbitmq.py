"""No single event stops a portal: refused and malformed events are parked, never lost.

Against the emulator and the real RabbitMQ. A parked event stays in the portal as an error row
(``event.offline.get {error: 1}``), is counted and listed by ``bitrix24-bridge parked``, and
``parked --replay`` delivers it once the cause is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import InProcessBridge, Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace
from tests.test_hardening_upstream import CorruptingTransport


def _sample(bridge: InProcessBridge, name: str, labels: dict[str, str]) -> float:
    value = bridge.service.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_refused_events_are_parked_and_do_not_hold_back_the_rest(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    deal_exchange = amqp_ns.exchange("oncrmdealadd")
    # Every DEAL is refused (nacked) by a full queue that rejects instead of dropping.
    await amqp_ns.declare_queue(
        deal_exchange, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    leads = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0.5",
        # Small pages: the refused events' page is one of many, most reserved only later.
        BRIDGE_PAGE_SIZE="2",
        BRIDGE_POISON_ATTEMPTS="3",
    )
    async with bridge_in_process(env) as bridge:
        await portal.generate("ONCRMDEALADD", 3)
        await portal.generate("ONCRMLEADADD", 100, start_id=100)
        await leads.wait_for(100, timeout=90)
        await until(
            lambda: _errors_are(portal, 3), "the refused events to be parked in the portal", 60
        )
        await portal.wait_empty(timeout=30)
        assert (
            _sample(
                bridge,
                "bitrix24_bridge_events_parked_total",
                {"event": "ONCRMDEALADD", "reason": "nack"},
            )
            == 3
        )
        assert bridge.service.state is not None
        assert await bridge.service.state.journal_all() == []
        session = next(iter(bridge.service.sessions.values()))
        assert session.drainer.stopped is None

        # `parked` lists them (read-only, beside the serving process).
        listed = _cli(env, "parked", "--json")
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)["portals"]
        assert sorted(row["EVENT_NAME"] for row in entry["parked"]) == ["ONCRMDEALADD"] * 3

        # The cause goes away; `parked --replay` hands the replay to the serving process.
        channel = await amqp_ns.channel()
        for name in list(amqp_ns._queues):
            if name != leads.queue:
                await channel.queue_delete(name)
                amqp_ns._queues.remove(name)
        deals = await amqp_ns.consume(deal_exchange)
        replay = _cli(env, "parked", "--replay")
        assert replay.returncode == 0, replay.stderr
        assert "handed to the serving process" in replay.stdout
        await deals.wait_for(3, timeout=30)
        await until(lambda: _errors_are(portal, 0), "the parked rows to be cleared", 30)
        await portal.wait_empty(timeout=30)
        assert bridge.service.state is not None
        assert await bridge.service.state.journal_all() == []
    assert len(set(leads.message_ids)) == 100
    assert len(set(deals.message_ids)) == 3


async def _errors_are(portal: Portal, count: int) -> bool:
    errors: int = (await portal.queue())["errors"]
    return errors == count


async def test_a_returned_event_redeclares_the_unrouted_path_and_is_kept(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env) as bridge:
        await portal.add([{"event": "ONCRMCOMPANYADD", "data": {"FIELDS": {"ID": "1"}}}])
        await portal.wait_empty(timeout=30)
        # Someone deletes the unrouted queue while the bridge runs: the next unrouted event
        # comes back (basic.return) once, then the path is declared again and it is kept.
        channel = await amqp_ns.channel()
        await channel.queue_delete(amqp_ns.unrouted_exchange)
        await portal.add([{"event": "ONCRMCOMPANYADD", "data": {"FIELDS": {"ID": "2"}}}])
        await portal.wait_empty(timeout=30)
        assert (await portal.queue())["errors"] == 0
        returned = _sample(bridge, "bitrix24_bridge_publish_failures_total", {"reason": "returned"})
        assert returned >= 1
    unrouted = await amqp_ns.consume_queue(amqp_ns.unrouted_exchange)
    (message,) = await unrouted.wait_for(1, timeout=10)
    assert json.loads(message.body)["EVENT_DATA"] == {"FIELDS": {"ID": "2"}}


class MalformingTransport(CorruptingTransport):
    """Always drops EVENT_NAME from the event with ``ID == bad_id`` in reservation answers."""

    def __init__(self, bad_id: str) -> None:
        super().__init__("no_event_name")
        self.bad_id = bad_id
        self.active = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        raw = await response.aread()
        await response.aclose()
        body = json.loads(raw)
        self._strip(body)
        return httpx.Response(
            response.status_code,
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )

    def _strip(self, value: Any) -> None:
        if isinstance(value, dict):
            if (
                value.get("ID") == self.bad_id
                and "EVENT_NAME" in value
                and "PROCESS_ID" not in value
            ):
                del value["EVENT_NAME"]
            for item in value.values():
                self._strip(item)
        elif isinstance(value, list):
            for item in value:
                self._strip(item)


async def test_a_malformed_event_is_parked_after_its_attempts_and_the_rest_flows(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0.5",
        BRIDGE_PAGE_SIZE="5",
        BRIDGE_POISON_ATTEMPTS="2",
    )
    async with bridge_in_process(env, transport=MalformingTransport(bad_id="3")) as bridge:
        await portal.generate("ONCRMLEADADD", 20)
        await collector.wait_for(19, timeout=60)
        await until(lambda: _errors_are(portal, 1), "the malformed event to be parked", 60)
        await portal.wait_empty(timeout=30)
        assert (
            _sample(
                bridge,
                "bitrix24_bridge_events_parked_total",
                {"event": "unknown", "reason": "malformed"},
            )
            == 1
        )
    ids = [json.loads(m.body)["ID"] for m in collector.messages]
    assert sorted(set(ids), key=int) == [str(n) for n in range(1, 21) if n != 3]
    # Nothing is lost: the parked row is still in the portal, readable with error=1.
    detail = (await portal.http.get("/_emulator/queue", params={"detail": "1"})).json()
    (row,) = detail["rows"]
    assert row["ID"] == "3"
    assert row["ERROR"] == "1"
