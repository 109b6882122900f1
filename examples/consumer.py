"""A consumer of bitrix24-bridge messages that processes every event once. Copy it and replace
``handle()`` with your own work.

    pip install aio-pika
    AMQP_URL=amqp://user:password@rabbitmq:5672/ python consumer.py --queue crm-sync \\
        --bind bitrix24.oncrmleadadd --bind 'diadoc.events:box-a.#' --db crm-sync.sqlite3

What it does, and why:

* Declares a durable queue and binds it to the exchanges it wants (``EXCHANGE[:ROUTING_KEY]``,
  key ``#`` by default). It declares each exchange exactly as the bridge does (durable topic,
  ``alternate-exchange`` = the unrouted exchange), so either side may start first.
* Processes each message once by its ``message_id``. The bridge delivers at least once: it
  removes an event from its source (Bitrix24's ``event.offline.clear``, the Diadoc cursor) only
  after RabbitMQ confirmed it, so a crash between the confirm and the removal, a confirm lost
  on its way back, or a lost state file publishes that page again, with the same
  ``message_id``. RabbitMQ also redelivers what a consumer received but had not acknowledged
  when it died.
* Records the ``message_id`` and runs ``handle()`` in one SQLite transaction, then acknowledges.
  A crash before the commit leaves nothing behind (the redelivery is processed); a crash after
  it is caught by the record (the redelivery is skipped). Keep your effect in that transaction
  (or make it idempotent): an effect outside it can still happen twice.

The de-duplication window. A duplicate from the bridge arrives when the bridge retries the page:
on its next pass (back-off of at most a minute) or right after it restarts, so normally within
minutes of the first copy; later only if the bridge stays down that long. It can never come
after the source forgot the event (a Bitrix24 reservation is dropped about 34 days after the
event). Redeliveries by RabbitMQ come within seconds. ``--keep-days`` (default 7) must exceed
the longest bridge outage you would tolerate unnoticed; ``--keep-max`` (default 1,000,000 ids,
about 100 MB) must exceed the number of events you receive in that window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("consumer")

PRUNE_EVERY = 1000  # messages between two prunings of the de-duplication store


class SeenStore:
    """The ``message_id``s processed lately, bounded by age and by count, in SQLite."""

    def __init__(self, path: str, *, keep_seconds: float, keep_max: int) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS seen (message_id TEXT PRIMARY KEY, seen_at REAL NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS seen_by_age ON seen (seen_at)")
        self.keep_seconds = keep_seconds
        self.keep_max = keep_max

    def process_once(self, message_id: str, work: Any, *args: Any) -> bool:
        """Run ``work(db, *args)`` unless ``message_id`` was seen; False when it was."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            inserted = self.db.execute(
                "INSERT OR IGNORE INTO seen (message_id, seen_at) VALUES (?, ?)",
                (message_id, time.time()),
            ).rowcount
            if inserted:
                work(self.db, *args)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return bool(inserted)

    def prune(self) -> int:
        with self.db:
            old = self.db.execute(
                "DELETE FROM seen WHERE seen_at < ?", (time.time() - self.keep_seconds,)
            ).rowcount
            excess = self.db.execute(
                "DELETE FROM seen WHERE message_id IN (SELECT message_id FROM seen "
                "ORDER BY seen_at DESC LIMIT -1 OFFSET ?)",
                (self.keep_max,),
            ).rowcount
        return old + excess


def handle(db: sqlite3.Connection, message: AbstractIncomingMessage, event: Any) -> None:
    """Your work goes here. This one stores the event, inside the de-duplication transaction."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, message_id TEXT, "
        "exchange TEXT, routing_key TEXT, type TEXT, body TEXT)"
    )
    row = (message.message_id, message.exchange, message.routing_key, message.type)
    db.execute(
        "INSERT INTO events (message_id, exchange, routing_key, type, body) VALUES (?,?,?,?,?)",
        (*row, json.dumps(event)),
    )


async def consume(args: argparse.Namespace) -> None:
    store = SeenStore(args.db, keep_seconds=args.keep_days * 86400, keep_max=args.keep_max)
    store.prune()
    connection = await aio_pika.connect_robust(args.amqp_url)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.declare_queue(args.queue, durable=True)
        for spec in args.bind:
            name, _, key = spec.partition(":")
            exchange = await channel.declare_exchange(
                name,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                arguments={"alternate-exchange": args.unrouted_exchange},
            )
            await queue.bind(exchange, routing_key=key or "#")
        handled = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal handled
            # Acknowledged after the commit; an exception puts the message back on the queue.
            async with message.process(requeue=True):
                event = json.loads(message.body)
                if message.message_id is None:
                    log.warning("message without message_id: processed without de-duplication")
                    store.process_once(os.urandom(16).hex(), handle, message, event)
                elif not store.process_once(message.message_id, handle, message, event):
                    log.info(
                        "duplicate skipped message_id=%s redelivered=%s",
                        message.message_id,
                        message.redelivered,
                    )
                elif message.redelivered:
                    log.info("redelivery processed message_id=%s", message.message_id)
            handled += 1
            if handled % PRUNE_EVERY == 0:
                store.prune()

        await queue.consume(on_message)
        log.info("consuming from %s", args.queue)
        await stop.wait()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://127.0.0.1/"))
    parser.add_argument("--queue", required=True, help="durable queue of this consumer")
    parser.add_argument("--bind", action="append", required=True, help="EXCHANGE[:ROUTING_KEY]")
    parser.add_argument("--unrouted-exchange", default="bitrix24.unrouted")
    parser.add_argument("--db", default="consumer.sqlite3", help="de-duplication store")
    parser.add_argument("--keep-days", type=float, default=7.0)
    parser.add_argument("--keep-max", type=int, default=1_000_000)
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(consume(args))


if __name__ == "__main__":
    main()
