"""The baseline: plain aio-pika publishing with confirms, in a process of its own.

``python -m bench.rawpublish URL EXCHANGE COUNT MEMBER_ID DOMAIN`` publishes ``COUNT`` messages
built like the bridge's (same body, properties and headers; persistent, ``mandatory``) and prints
``{"started": t0, "confirmed": t1}`` on ``time.monotonic()``'s clock (shared by every process).

Pipelining: ``WINDOW`` publishes at a time with ``asyncio.gather`` on a channel with publisher
confirms, each awaiting its own confirm, then the next window. Tried on this machine against a
bounded in-flight window (refilled as confirms arrive) and windows of 500 to 5,000: gathering
windows of 1,000 was the fastest.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence

import aio_pika

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


async def publish(url: str, exchange_name: str, items: Sequence[Prepared]) -> tuple[float, float]:
    """Publish ``items`` to an existing exchange; (first publish, last confirm) times."""
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
        return started, time.monotonic()
    finally:
        await connection.close()


def main(argv: Sequence[str]) -> int:
    url, exchange, count, member_id, domain = argv
    items = prepare(int(count), event=EVENT, member_id=member_id, domain=domain)
    started, confirmed = asyncio.run(publish(url, exchange, items))
    print(json.dumps({"started": started, "confirmed": confirmed}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
