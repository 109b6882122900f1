"""RabbitMQ for the benchmark: a throwaway vhost, names under one prefix, and counting consumers.

With ``rabbitmqctl`` at hand every run gets its own vhost, deleted at the end; without it the
names get a unique prefix inside the configured vhost and are deleted one by one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiormq
from aiormq.abc import DeliveredMessage
from yarl import URL

BROKER_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


class Broker:
    """One vhost (or prefix) for the whole benchmark run."""

    def __init__(self, base_url: str = BROKER_URL) -> None:
        self.base = URL(base_url)
        self.vhost: str | None = None
        self.url = str(self.base)
        self._namespaces: list[Namespace] = []

    def open(self) -> Broker:
        if shutil.which("rabbitmqctl") is not None:
            vhost = f"bench-{uuid.uuid4().hex[:10]}"
            try:
                _rabbitmqctl("add_vhost", vhost)
                user = self.base.user or "guest"
                _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                return self  # not allowed to administer: fall back to prefixes
            self.vhost = vhost
            self.url = str(self.base.with_path("/" + vhost))
        return self

    def namespace(self, label: str) -> Namespace:
        ns = Namespace(self.url, f"bench.{label}.{uuid.uuid4().hex[:8]}")
        self._namespaces.append(ns)
        return ns

    async def close(self) -> None:
        for ns in self._namespaces:
            await ns.close()
        if self.vhost is not None:
            await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", "-q", "delete_vhost", self.vhost],
                capture_output=True,
                timeout=60,
            )
            return
        for ns in self._namespaces:
            await ns.delete()


@dataclass
class Consumer:
    """Counts what reaches one queue (no-ack); ``on_body`` sees every body if set,
    ``on_message`` every message (properties and all)."""

    queue: str
    count: int = 0
    on_body: Callable[[bytes], None] | None = None
    on_message: Callable[[DeliveredMessage], None] | None = None
    last_at: float = 0.0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _deliver(self, message: DeliveredMessage) -> None:
        self.count += 1
        self.last_at = time.monotonic()
        if self.on_body is not None:
            self.on_body(message.body)
        if self.on_message is not None:
            self.on_message(message)
        self._changed.set()

    async def wait_for(self, count: int, within: float) -> bool:
        """True once ``count`` messages arrived, False if ``within`` seconds passed first."""
        deadline = time.monotonic() + within
        while self.count < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                continue
        return True


class Namespace:
    """Exchanges and queues under one prefix, declared exactly as the bridge declares them."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.exchange_template = f"{prefix}.bitrix24.{{event}}"
        self.unrouted_exchange = f"{prefix}.unrouted"
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._exchanges: set[str] = set()
        self._queues: list[str] = []

    def exchange(self, event: str) -> str:
        return self.exchange_template.format(event=event.lower())

    async def channel(self) -> aiormq.abc.AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aiormq.connect(self.url)
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def declare_exchange(self, name: str) -> None:
        channel = await self.channel()
        await channel.exchange_declare(self.unrouted_exchange, exchange_type="fanout", durable=True)
        await channel.exchange_declare(
            name,
            exchange_type="topic",
            durable=True,
            arguments={"alternate-exchange": self.unrouted_exchange},
        )
        self._exchanges.update({name, self.unrouted_exchange})

    async def consume(
        self, exchange: str, on_body: Callable[[bytes], None] | None = None
    ) -> Consumer:
        """A fresh durable queue bound to ``exchange`` (declared first), consumed without acks."""
        await self.declare_exchange(exchange)
        channel = await self.channel()
        name = f"{self.prefix}.q{len(self._queues) + 1}"
        await channel.queue_declare(name, durable=True)
        await channel.queue_bind(name, exchange, routing_key="#")
        self._queues.append(name)
        consumer = Consumer(name, on_body=on_body)
        await channel.basic_consume(name, consumer._deliver, no_ack=True)
        return consumer

    async def delete(self) -> None:
        try:
            if self._channel is not None and not self._channel.is_closed:
                await self._channel.close()  # cancels our consumers before their queues go
            channel = await self.channel()
            # The bridge declares the unrouted queue under the exchange's name.
            for queue in [*self._queues, self.unrouted_exchange]:
                await channel.queue_delete(queue)
            for exchange in self._exchanges:
                await channel.exchange_delete(exchange)
        except aiormq.exceptions.AMQPError:
            pass
        await self.close()

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = self._channel = None
