"""RabbitMQ fixtures: one throwaway vhost per session, one name prefix per test.

Tests that need the broker fail when it does not answer; they are never skipped, so a green run
always means the broker-side behaviour was exercised.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from yarl import URL

BROKER_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
AMQP_GREETING = b"AMQP\x00\x00\x09\x01"
METHOD_FRAME = 1


def _broker_answers(url: URL) -> str | None:
    """None when an AMQP 0-9-1 broker greets us at ``url``, else why not."""
    host, port = url.host or "127.0.0.1", url.port or 5672
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(AMQP_GREETING)
            sock.settimeout(5)
            first = sock.recv(8)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if not first or first[0] != METHOD_FRAME:
        return f"unexpected greeting {first!r}"
    return None


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of a vhost created for this session (deleted afterwards)."""
    base = URL(BROKER_URL)
    reason = _broker_answers(base)
    if reason is not None:
        required = os.environ.get("BRIDGE_TEST_REQUIRE_BROKER") == "1"
        pytest.fail(
            f"RabbitMQ does not answer at {base.host}:{base.port} ({reason}); "
            + ("CI requires it (BRIDGE_TEST_REQUIRE_BROKER=1)" if required else "start it")
            + " -- broker tests are never skipped",
            pytrace=False,
        )
    if shutil.which("rabbitmqctl") is None:
        # A broker we cannot administer (e.g. in another container): per-test prefixes still
        # keep tests apart, inside the configured vhost.
        yield str(base)
        return
    vhost = f"bridge-test-{uuid.uuid4().hex[:10]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, base.user or "guest", ".*", ".*", ".*")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create test vhost: {exc.stderr.decode().strip()}", pytrace=False)
    try:
        yield str(base.with_path("/" + vhost))
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60
        )


class Collector:
    """Messages consumed from one queue (auto-ack), in arrival order."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    @property
    def message_ids(self) -> list[str | None]:
        return [m.message_id for m in self.messages]

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[AbstractIncomingMessage]:
        """Wait until at least ``count`` messages arrived; fail the test otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.messages) < count:
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                pytest.fail(f"{self.queue}: {len(self.messages)} of {count} messages arrived")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                continue
        return self.messages

    async def settle(
        self, quiet: float = 0.5, timeout: float = 30.0
    ) -> list[AbstractIncomingMessage]:
        """Wait until nothing new arrived for ``quiet`` seconds; return everything so far."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), quiet)
            except TimeoutError:
                return self.messages
        pytest.fail(f"{self.queue}: messages kept arriving for {timeout}s")


class AmqpNamespace:
    """A unique name prefix for one test, and helpers that observe the broker under it."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.exchange_template = f"{prefix}.bitrix24.{{event}}"
        self.unrouted_exchange = f"{prefix}.unrouted"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queues: list[str] = []
        self._exchanges: list[str] = []
        self._counter = 0

    def exchange(self, event: str) -> str:
        return self.exchange_template.format(event=event)

    async def channel(self) -> AbstractChannel:
        """A channel of the test's own connection (reopened if a test closed it)."""
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.url)
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def declare_exchange(self, name: str, *, passive: bool = False) -> None:
        """Declare ``name`` exactly as the bridge does (durable topic, unrouted alternate)."""
        channel = await self.channel()
        await channel.declare_exchange(
            name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            passive=passive,
            arguments={"alternate-exchange": self.unrouted_exchange},
        )
        self._exchanges.append(name)

    async def declare_queue(
        self,
        exchange: str,
        routing_key: str = "#",
        *,
        arguments: dict[str, Any] | None = None,
        declare_exchange: bool = True,
    ) -> str:
        """A fresh queue bound to ``exchange``; returns its name."""
        if declare_exchange:
            await self.declare_exchange(exchange)
        channel = await self.channel()
        self._counter += 1
        name = f"{self.prefix}.q{self._counter}"
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(exchange, routing_key)
        self._queues.append(name)
        return name

    async def consume(
        self,
        exchange: str,
        routing_key: str = "#",
        *,
        arguments: dict[str, Any] | None = None,
        declare_exchange: bool = True,
    ) -> Collector:
        """Bind a fresh queue to ``exchange`` and start collecting what reaches it."""
        name = await self.declare_queue(
            exchange, routing_key, arguments=arguments, declare_exchange=declare_exchange
        )
        return await self.consume_queue(name)

    async def consume_queue(self, name: str) -> Collector:
        """Collect from an existing queue (the unrouted queue, say)."""
        channel = await self.channel()
        queue = await channel.get_queue(name, ensure=True)
        collector = Collector(name)
        await queue.consume(collector._on_message, no_ack=True)
        return collector

    async def get_queue(self, name: str) -> AbstractQueue:
        """The queue, looked up passively (its ``declaration_result`` has message counts)."""
        channel = await self.channel()
        return await channel.declare_queue(name, passive=True)

    async def message_count(self, name: str) -> int:
        queue = await self.get_queue(name)
        count = queue.declaration_result.message_count
        return int(count or 0)

    async def close(self) -> None:
        if self._connection is None or self._connection.is_closed:
            return
        try:
            if self._channel is not None and not self._channel.is_closed:
                await self._channel.close()  # cancels consumers before their queues go away
            channel = await self.channel()
            for queue in [*self._queues, self.unrouted_exchange]:
                await channel.queue_delete(queue)
            for exchange in {*self._exchanges, self.unrouted_exchange}:
                await channel.exchange_delete(exchange)
        except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError):
            pass  # best effort: the session vhost goes away anyway
        finally:
            await self._connection.close()


@pytest.fixture
async def amqp_ns(amqp_url: str) -> AsyncIterator[AmqpNamespace]:
    """Per-test names: ``exchange_template``, ``unrouted_exchange``, plus ``consume()``."""
    ns = AmqpNamespace(amqp_url, "t" + uuid.uuid4().hex[:12])
    try:
        yield ns
    finally:
        await ns.close()
