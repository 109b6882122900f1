"""Broker policies: exchanges managed elsewhere, a user without ``configure``, quorum queues, and a
broker that blocks publishers. In every case nothing is cleared that the broker did not store.

Checked by breaking the code on purpose (then restored): with ``Service`` passing
``declare=True`` to its publisher whatever ``BRIDGE_DECLARE`` says, the missing-exchange test
gets no readiness reason (the exchange is created) and the no-configure bridge cannot start.
The memory-alarm test was not broken on purpose: the code to break (``publisher.py``,
``offline_queue.py``) is being changed elsewhere; its "held" check is the one the
missing-exchange test proves.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path

import aio_pika
import aiormq
import httpx
import pytest
from yarl import URL

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import InProcessBridge, Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace

EVENT = "ONCRMLEADADD"


async def _env(
    emulated: tuple[EmulatorServer, Portal, int], ns: AmqpNamespace, tmp: Path, **extra: str
) -> dict[str, str]:
    _server, portal, port = emulated
    return await bridge_env(
        portal,
        ns,
        tmp / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="1",
        **extra,
    )


async def _predeclare_unrouted(ns: AmqpNamespace) -> None:
    """The unrouted exchange and queue, as an operator's definitions file would create them."""
    channel = await ns.channel()
    exchange = await channel.declare_exchange(
        ns.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(ns.unrouted_exchange, durable=True)
    await queue.bind(exchange)


async def _exchange_exists(ns: AmqpNamespace, name: str) -> bool:
    connection = await aio_pika.connect(ns.url)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(name, passive=True)
        return True
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()


def _cleared(bridge: InProcessBridge) -> float:
    value = bridge.service.metrics.registry.get_sample_value(
        "bitrix24_bridge_events_cleared_total", {"event": EVENT}
    )
    return value or 0.0


async def _held(portal: Portal, total: int) -> None:
    """Every event is still in the portal, free or reserved: nothing was cleared."""
    queue = await portal.queue()
    reserved: dict[str, int] = queue["reserved"]
    assert queue["free"] + sum(reserved.values()) == total, queue


async def test_declare_false_with_exchanges_managed_elsewhere(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, _port = emulated
    exchange = amqp_ns.exchange(EVENT.lower())
    await _predeclare_unrouted(amqp_ns)
    collector = await amqp_ns.consume(exchange)  # declares the event exchange too
    other = amqp_ns.exchange("oncrmdealadd")
    env = await _env(emulated, amqp_ns, tmp_path, BRIDGE_DECLARE="false")
    async with bridge_in_process(env):
        await portal.generate(EVENT, 200)
        await collector.wait_for(200, timeout=30)
        await portal.wait_empty(timeout=30)
    assert len(set(collector.message_ids)) == 200
    # Passive checks only: the bridge created nothing of its own.
    assert not await _exchange_exists(amqp_ns, other)


async def test_declare_false_with_a_missing_exchange_is_not_ready_and_clears_nothing(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, _port = emulated
    exchange = amqp_ns.exchange(EVENT.lower())
    await _predeclare_unrouted(amqp_ns)
    env = await _env(emulated, amqp_ns, tmp_path, BRIDGE_DECLARE="false")
    async with bridge_in_process(env) as bridge, httpx.AsyncClient(base_url=bridge.url) as http:
        assert (await http.get("/readyz")).status_code == 200
        await portal.generate(EVENT, 120)

        async def not_ready() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await until(not_ready, "/readyz to report the missing exchange")
        reason = (await http.get("/readyz")).json()["reason"]
        assert exchange in reason, reason
        assert "missing" in reason, reason
        await _held(portal, 120)
        assert _cleared(bridge) == 0
        assert not await _exchange_exists(amqp_ns, exchange), "declare=false created it"

        # The operator creates it: the same events go through, and readiness comes back.
        collector = await amqp_ns.consume(exchange)
        await portal.wait_empty(timeout=60)
        await collector.wait_for(120, timeout=30)

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await until(ready, "/readyz to recover")
    assert len(set(collector.message_ids)) == 120


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def test_user_without_configure_permission(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, _port = emulated
    url = URL(amqp_ns.url)
    vhost = url.path.lstrip("/") or "/"
    user, password = f"bridge-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    exchange = amqp_ns.exchange(EVENT.lower())
    await _predeclare_unrouted(amqp_ns)
    collector = await amqp_ns.consume(exchange)
    _ctl("add_user", user, password)
    try:
        _ctl("set_permissions", "-p", vhost, user, "^$", ".*", ".*")
        limited = str(url.with_user(user).with_password(password))
        # The restriction is real: this user cannot declare anything.
        connection = await aio_pika.connect(limited)
        try:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await channel.declare_exchange(f"{amqp_ns.prefix}.nope", durable=True)
        finally:
            await connection.close()
        env = await _env(
            emulated, amqp_ns, tmp_path, BRIDGE_DECLARE="false", BRIDGE_AMQP_URL=limited
        )
        async with bridge_in_process(env):
            await portal.generate(EVENT, 150)
            await collector.wait_for(150, timeout=30)
            await portal.wait_empty(timeout=30)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
    assert len(set(collector.message_ids)) == 150


async def test_quorum_queues_receive_everything(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, _port = emulated
    exchanges = [amqp_ns.exchange(e.lower()) for e in (EVENT, "ONCRMDEALADD")]
    collectors = [
        await amqp_ns.consume(name, arguments={"x-queue-type": "quorum"}) for name in exchanges
    ]
    env = await _env(emulated, amqp_ns, tmp_path)
    async with bridge_in_process(env):
        await portal.generate(EVENT, 300)
        await portal.generate("ONCRMDEALADD", 300, start_id=1001)
        for collector in collectors:
            await collector.wait_for(300, timeout=30)
        await portal.wait_empty(timeout=30)
    for collector in collectors:
        assert len(set(collector.message_ids)) == 300
    # They really are quorum queues (a classic queue would prove nothing new).
    vhost = URL(amqp_ns.url).path.lstrip("/") or "/"
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    types = dict(line.split()[:2] for line in listed.splitlines() if line.strip())
    assert all(types.get(c.queue) == "quorum" for c in collectors), types


def _eval(expression: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression], check=True, capture_output=True, timeout=60
    )
    return done.stdout.decode().strip()


@pytest.mark.serial
async def test_memory_alarm_blocks_publishing_and_nothing_is_cleared_until_it_clears(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, _port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange(EVENT.lower()))
    env = await _env(emulated, amqp_ns, tmp_path, BRIDGE_CONFIRM_TIMEOUT="2")
    total = 200
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()  # the exchanges exist, the connection is warm
        saved = _eval("vm_memory_monitor:get_vm_memory_high_watermark().")
        try:
            _eval("vm_memory_monitor:set_vm_memory_high_watermark({absolute, 1}).")

            async def alarmed() -> bool:
                return "memory" in _eval("rabbit_alarm:get_alarms().")

            await until(alarmed, "the memory alarm", timeout=15)
            await portal.generate(EVENT, total)
            registry = bridge.service.metrics.registry

            async def timed_out() -> bool:
                value = registry.get_sample_value(
                    "bitrix24_bridge_publish_failures_total", {"reason": "timeout"}
                )
                return bool(value)

            await until(timed_out, "a publish to time out against the blocked broker")
            await _held(portal, total)
            assert _cleared(bridge) == 0
            assert bridge.service.publisher.connected, "blocked is not disconnected"
        finally:
            _eval(f"vm_memory_monitor:set_vm_memory_high_watermark({saved}).")
        await portal.wait_empty(timeout=60)
        await collector.wait_for(total, timeout=30)
        await collector.settle(quiet=0.3)
    assert len(set(collector.message_ids)) == total
    with contextlib.suppress(Exception):
        assert "memory" not in _eval("rabbit_alarm:get_alarms().")
