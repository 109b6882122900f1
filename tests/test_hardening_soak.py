"""Soak: events arrive continuously through a bad night, and every one of them is consumed.

For ``BRIDGE_SOAK_SECONDS`` (default 40) of chaos: the emulated portal gets new events every
0.1 s and injects random faults (500s, rate limits, operating limits, lost reservations, token
expiry); the bridge runs as a subprocess whose broker connection goes through a TCP proxy that
is cut every few seconds; RabbitMQ's application is stopped and started (always restarted, in a
``finally``); the bridge is SIGKILLed and restarted. Then a calm phase: faults off, one last
restart (which also resets the drain back-off), and the bridge drains to empty.

At the end every created event was consumed at least once (a durable queue bound before the
first event, manual acks, a consumer that reconnects), the portal queue is empty (free and
reserved), the journal is empty, and the bridge stops cleanly.

Checked by breaking the code on purpose (then restored): with ``messages.to_message`` sending
every event whose ID ends in 7 to another exchange (stored and cleared, but never reaching the
consumer's queue), the "consumed" check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import BridgeProcess, Portal, bridge_env, emulated_portal, until
from tests.plugins.broker import AmqpNamespace
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds

SOAK_SECONDS = float(os.environ.get("BRIDGE_SOAK_SECONDS", "40"))
EVENT = "ONCRMLEADADD"
BATCH = 5  # events per tick of the generator


def _broker_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            sock.settimeout(2)
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


def _ctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=timeout)


async def _restart_broker_app(outage: float) -> float:
    """stop_app, a short outage, start_app; always started again. Answers the outage length."""
    started = time.monotonic()
    try:
        done = await asyncio.to_thread(_ctl, "stop_app")
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(outage)  # the outage is the subject
    finally:
        await asyncio.to_thread(_ctl, "start_app")
        await asyncio.to_thread(_ctl, "await_startup")

        async def answers() -> bool:
            return await asyncio.to_thread(_broker_answers)

        await until(answers, "RabbitMQ to come back", timeout=60)
    return time.monotonic() - started


class Consumer:
    """Consumes with manual acks and reconnects by itself (the broker will go away)."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.ids: list[str] = []
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(self.url, reconnect_interval=0.5)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(self.queue, passive=True)
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.ids.append(str(body["EVENT_DATA"]["FIELDS"]["ID"]))
        # A lost ack only means a redelivery: at least once is what is checked.
        with contextlib.suppress(Exception):
            await message.ack()

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()


@pytest.fixture
async def emulated() -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    # A real portal's minTimeout: notifications are suppressed for a second after each one.
    async with emulated_portal(min_timeout=1) as running:
        yield running


FAULTS: list[dict[str, object]] = [
    {"fail": {"event.offline.get": 2}},
    {"fail": {"batch": 1}},
    {"fail": {"event.offline.clear": 1}},
    {"fail_with": {"batch": {"error": "QUERY_LIMIT_EXCEEDED", "count": 3}}},
    {"fail_with": {"event.offline.get": {"error": "OPERATION_TIME_LIMIT", "count": 1}}},
    {"drop_next_reservation": True},
    {"expire_tokens": True},
]


def _journal_size(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
        return int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])


@pytest.mark.serial
@pytest.mark.slow
async def test_soak(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_url: str,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    _server, portal, port = emulated
    ns = AmqpNamespace(amqp_url, "soak" + os.urandom(4).hex())
    exchange = ns.exchange(EVENT.lower())
    # Declared (durable, exactly as the bridge declares) and bound before the first event.
    setup = await aio_pika.connect(amqp_url)
    channel = await setup.channel()
    await channel.declare_exchange(
        exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": ns.unrouted_exchange},
    )
    queue_name = f"{ns.prefix}.all"
    queue = await channel.declare_queue(queue_name, durable=True)
    await queue.bind(exchange, "#")
    await setup.close()

    consumer = Consumer(amqp_url, queue_name)
    await consumer.start()
    proxy = await TcpProxy().start()
    state_path = tmp_path / "state.sqlite3"
    env = await bridge_env(
        portal,
        ns,
        state_path,
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_AMQP_URL=proxy.url(amqp_url),
        BRIDGE_POLL_INTERVAL="1",
        BRIDGE_CONFIRM_TIMEOUT="3",
        BRIDGE_LOG_LEVEL="WARNING",
    )
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    created: list[str] = []
    counts = {"faults": 0, "cuts": 0, "kills": 0, "broker_restarts": 0}
    next_id = 1

    async def generate(stop: asyncio.Event) -> None:
        nonlocal next_id
        while not stop.is_set():
            await portal.generate(EVENT, BATCH, start_id=next_id)
            created.extend(str(i) for i in range(next_id, next_id + BATCH))
            next_id += BATCH
            await asyncio.sleep(0.1)  # events keep arriving: the pace is the subject

    stop = asyncio.Event()
    generator: asyncio.Task[None] | None = None
    try:
        bridge.start()
        await bridge.wait_live()
        generator = asyncio.create_task(generate(stop))
        chaos_ends = time.monotonic() + SOAK_SECONDS
        broker_restarts_at = [SOAK_SECONDS / 3] + (
            [2 * SOAK_SECONDS / 3] if SOAK_SECONDS >= 60 else []
        )
        kills_at = [SOAK_SECONDS * f for f in (0.2, 0.5, 0.8)]
        begun = time.monotonic()
        next_cut = begun + rng.uniform(2, 5)
        next_fault = begun + rng.uniform(0.5, 1.5)
        while time.monotonic() < chaos_ends:
            now = time.monotonic()
            elapsed = now - begun
            if broker_restarts_at and elapsed >= broker_restarts_at[0]:
                broker_restarts_at.pop(0)
                await _restart_broker_app(outage=rng.uniform(1, 3))
                counts["broker_restarts"] += 1
            elif kills_at and elapsed >= kills_at[0]:
                kills_at.pop(0)
                bridge.kill()
                counts["kills"] += 1
                await asyncio.sleep(rng.uniform(0.1, 1.0))  # dead for a while, events pile up
                bridge.start()
                await bridge.wait_live()
            elif now >= next_cut:
                counts["cuts"] += bool(proxy.cut())
                next_cut = now + rng.uniform(2, 5)
            elif now >= next_fault:
                await portal.faults(**rng.choice(FAULTS))
                counts["faults"] += 1
                next_fault = now + rng.uniform(0.5, 1.5)
            await asyncio.sleep(0.05)  # the schedule's tick: the night goes on

        # Calm: no new events, faults off, one restart that also resets the drain back-off.
        stop.set()
        await generator
        await portal.faults(
            fail={"event.offline.get": 0, "batch": 0, "event.offline.clear": 0},
            fail_with={
                "batch": {"error": "QUERY_LIMIT_EXCEEDED", "count": 0},
                "event.offline.get": {"error": "OPERATION_TIME_LIMIT", "count": 0},
            },
            drop_next_reservation=False,
        )
        bridge.kill()
        counts["kills"] += 1
        bridge.start()
        await bridge.wait_live()
        await portal.wait_empty(timeout=90)
        wanted = set(created)
        settled = holds(lambda: wanted <= set(consumer.ids) and not _journal_size(state_path))
        try:
            await until(settled, "every event consumed and the journal empty", timeout=60)
        except AssertionError:
            missing = len(wanted - set(consumer.ids))
            journal = _journal_size(state_path)
            raise AssertionError(
                f"missing {missing} events, journal {journal}: {bridge.tail()}"
            ) from None
        assert bridge.terminate() == 0, bridge.tail()
    finally:
        stop.set()
        if generator is not None:
            generator.cancel()
            await asyncio.gather(generator, return_exceptions=True)
        bridge.stop()
        await proxy.close()
        await consumer.close()
        cleanup = await aio_pika.connect(amqp_url)
        with contextlib.suppress(Exception):
            cleanup_channel = await cleanup.channel()
            await cleanup_channel.queue_delete(queue_name)
            await cleanup_channel.exchange_delete(exchange)
        await cleanup.close()

    stats = await portal.stats()
    consumed = consumer.ids
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: created={len(created)} consumed={len(consumed)} "
        f"unique={len(set(consumed))} duplicates={len(consumed) - len(set(consumed))} "
        f"faults_injected={counts['faults']} upstream_errors={stats['errors']} "
        f"cuts={counts['cuts']} broker_restarts={counts['broker_restarts']} "
        f"restarts={counts['kills']} bridge_starts={bridge.starts}"
    )
    assert set(created) <= set(consumed)
    assert await portal.is_empty()
    assert _journal_size(state_path) == 0
    # The chaos really happened.
    assert counts["broker_restarts"] >= 1
    assert counts["kills"] >= 3
    assert counts["cuts"] >= 1
