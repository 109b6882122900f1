"""The baseline: plain confirmed publishing from aio-pika, in a process of its own.

``python -m bench.rawpublish STRATEGY URL EXCHANGE COUNT MEMBER_ID DOMAIN`` publishes ``COUNT``
messages built like the bridge's (same body, properties and headers; persistent, ``mandatory``)
and prints ``{"started": t0, "confirmed": t1}`` on ``time.monotonic()``'s clock (shared by
every process).

Pipelining: ``WINDOW`` publishes at a time with ``asyncio.gather`` on a channel with publisher
confirms, each awaiting its own confirm, then the next window (tried on this machine against a
bounded in-flight window refilled as confirms arrive, and windows of 500 to 5,000: gathered
windows of 1,000 were the fastest). Two strategies:

* ``aio-pika``: ``Exchange.publish(aio_pika.Message(...))``, aio-pika's public API;
* ``aiormq``: ``basic_publish`` on the aiormq channel under aio-pika (what aio-pika itself
  calls), skipping aio-pika's per-message wrapper;
* ``aiormq+uvloop``: the same on uvloop, the event loop the bridge runs on.

The drain scenario runs both and compares the bridge with the faster.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence

import aio_pika
import aiormq
from pamqp import commands as spec

from bench.bodies import Prepared, prepare

WINDOW = 1000
EVENT = "ONCRMLEADADD"


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


def _properties(item: Prepared) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        headers=dict(item.headers),
        message_id=item.message_id,
        timestamp=item.timestamp,
        message_type=item.event,
        app_id="bitrix24-bridge",
    )


async def _with_aio_pika(url: str, exchange_name: str, items: Sequence[Prepared]) -> float:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        started = time.monotonic()
        for start in range(0, len(items), WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(_message(item), "bench", mandatory=True)
                    for item in items[start : start + WINDOW]
                )
            )
        return started
    finally:
        await connection.close()


async def _with_aiormq(url: str, exchange_name: str, items: Sequence[Prepared]) -> float:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        started = time.monotonic()
        for start in range(0, len(items), WINDOW):
            await asyncio.gather(
                *(
                    channel.basic_publish(
                        item.body,
                        exchange=exchange_name,
                        routing_key="bench",
                        properties=_properties(item),
                        mandatory=True,
                    )
                    for item in items[start : start + WINDOW]
                )
            )
        return started
    finally:
        await connection.close()


STRATEGIES = {
    "aio-pika": _with_aio_pika,
    "aiormq": _with_aiormq,
    # The bridge runs on uvloop; so may the baseline, to compare like with like.
    "aiormq+uvloop": _with_aiormq,
}


async def publish(
    strategy: str, url: str, exchange_name: str, items: Sequence[Prepared]
) -> tuple[float, float]:
    """Publish ``items`` to an existing exchange; (first publish, last confirm) times."""
    started = await STRATEGIES[strategy](url, exchange_name, items)
    return started, time.monotonic()


def main(argv: Sequence[str]) -> int:
    strategy, url, exchange, count, member_id, domain = argv
    items = prepare(int(count), event=EVENT, member_id=member_id, domain=domain)
    factory = None
    if strategy.endswith("+uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        started, confirmed = runner.run(publish(strategy, url, exchange, items))
    print(json.dumps({"started": started, "confirmed": confirmed}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
