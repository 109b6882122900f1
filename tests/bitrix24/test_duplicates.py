"""Duplicates do not grow with the length of an outage.

Failed clears and a broker that goes silent for longer than the confirm timeout used to
re-publish the same pages on every retry (6 and 7 copies of each event). The journal now
remembers what was confirmed (a retry only clears), and a message whose confirm is still
outstanding is never sent again on the same channel: at most 2 copies of any event.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process
from tests.plugins.broker import AmqpNamespace
from tests.plugins.tcpproxy import TcpProxy


async def test_failing_clears_never_publish_an_event_twice(
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
        BRIDGE_PAGE_SIZE="20",
    )
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        await portal.faults(fail={"event.offline.clear": 24})
        await portal.generate("ONCRMLEADADD", 200)
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0)
        stats = await portal.stats()
        assert stats["errors"]["INTERNAL_SERVER_ERROR"] == 24  # every injected failure struck
        assert bridge.service.state is not None
        assert await bridge.service.state.journal_all() == []
    copies = Counter(collector.message_ids)
    assert len(copies) == 200
    assert max(copies.values()) == 1, f"re-published after failed clears: {copies.most_common(3)}"


async def test_a_broker_stall_longer_than_the_confirm_timeout_costs_at_most_two_copies(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    amqp_proxy: TcpProxy,
    amqp_url: str,
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
        BRIDGE_CONFIRM_TIMEOUT="1",
        BRIDGE_POLL_INTERVAL="0.5",
        BRIDGE_PAGE_SIZE="20",
    )
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        amqp_proxy.pause()  # the broker goes silent, the connection stays open
        await portal.generate("ONCRMLEADADD", 200)
        loop = asyncio.get_running_loop()
        stalled_at = loop.time()
        while loop.time() - stalled_at < 12:
            await asyncio.sleep(0.5)  # the 12 s stall is the test's subject, not a wait
        failures = bridge.service.metrics.registry.get_sample_value(
            "bitrix24_bridge_publish_failures_total", {"reason": "timeout"}
        )
        assert failures, "the stall did not make a publish time out"
        amqp_proxy.resume()
        await portal.wait_empty(timeout=120)
        await collector.settle(quiet=1.0)
        assert bridge.service.state is not None
        assert await bridge.service.state.journal_all() == []
    copies = Counter(collector.message_ids)
    assert len(copies) == 200
    assert max(copies.values()) <= 2, f"copies grew with the stall: {copies.most_common(3)}"
