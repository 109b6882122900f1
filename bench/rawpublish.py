"""The baseline: plain aio-pika publishing with confirms, as fast as it reasonably goes.

Two ways of pipelining, both persistent, ``mandatory`` and confirmed one by one, like the
bridge's messages; the faster one is the reference:

* ``window``: publish ``WINDOW`` messages with ``asyncio.gather``, wait for all their
  confirms, then the next window.
* ``inflight``: a bounded number of unconfirmed messages, refilled as each confirm arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika

from bench.bodies import Prepared

WINDOW = 1000
INFLIGHT = 1000


@dataclass
class RawRun:
    strategy: str
    count: int
    started: float  # perf_counter at the first publish
    confirmed: float  # perf_counter when the last confirm arrived


def _message(item: Prepared) -> aio_pika.Message:
    return aio_pika.Message(
        item.body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=dict(item.headers),
        message_id=item.message_id,
        timestamp=item.timestamp,
        type=item.event,
        app_id="bitrix24-bridge",
    )


async def _window(exchange: aio_pika.abc.AbstractExchange, items: Sequence[Prepared]) -> None:
    for start in range(0, len(items), WINDOW):
        await asyncio.gather(
            *(
                exchange.publish(_message(item), "bench", mandatory=True)
                for item in items[start : start + WINDOW]
            )
        )


async def _inflight(exchange: aio_pika.abc.AbstractExchange, items: Sequence[Prepared]) -> None:
    slots = asyncio.Semaphore(INFLIGHT)
    failures: list[BaseException] = []
    pending: set[asyncio.Task[object]] = set()

    def done(task: asyncio.Task[object]) -> None:
        pending.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    for item in items:
        await slots.acquire()
        task = asyncio.ensure_future(exchange.publish(_message(item), "bench", mandatory=True))
        pending.add(task)
        task.add_done_callback(done)
    if pending:
        await asyncio.wait(pending)
    if failures:
        raise failures[0]


STRATEGIES = {"window": _window, "inflight": _inflight}


async def publish(url: str, exchange_name: str, items: Sequence[Prepared], strategy: str) -> RawRun:
    """Publish ``items`` to an existing exchange; the clock runs from the first publish."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        started = time.perf_counter()
        await STRATEGIES[strategy](exchange, items)
        return RawRun(strategy, len(items), started, time.perf_counter())
    finally:
        await connection.close()
