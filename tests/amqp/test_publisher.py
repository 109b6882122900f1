"""The publisher against a real RabbitMQ: only what the broker acknowledged counts as confirmed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from bridge.amqp.protocol import OutgoingMessage, PublishResult
from bridge.amqp.publisher import AmqpPublisher as Publisher
from bridge.amqp.publisher import BrokerUnavailable, ExchangeMissing
from tests.harness import until
from tests.plugins.broker import AmqpNamespace
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds

EVENT = "ONCRMDEALUPDATE"
DOMAIN = "portal.example"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_messages(
    ns: AmqpNamespace,
    count: int,
    *,
    event: str = EVENT,
    routing_key: str = DOMAIN,
    start: int = 1,
    padding: int = 0,
) -> list[OutgoingMessage]:
    messages = []
    for n in range(start, start + count):
        stamp = T0 + timedelta(seconds=n)
        body = {
            "ID": str(n),
            "TIMESTAMP_X": stamp.isoformat(),
            "EVENT_NAME": event,
            "EVENT_DATA": {"FIELDS": {"ID": n}, "PAD": "x" * padding},
            "EVENT_ADDITIONAL": {},
            "MESSAGE_ID": f"m{n}",
        }
        messages.append(
            OutgoingMessage(
                exchange=ns.exchange(event.lower()),
                routing_key=routing_key,
                body=json.dumps(body, separators=(",", ":")).encode(),
                message_id=f"member1:{n}:{stamp.isoformat()}",
                type=event,
                timestamp=stamp,
                headers={
                    "x-bitrix24-domain": DOMAIN,
                    "x-bitrix24-event": event,
                    "x-bitrix24-event-id": str(n),
                },
                key=f"m{n}",
            )
        )
    return messages


def ids(messages: Any) -> list[str]:
    return [m.message_id for m in messages]


@pytest.fixture
async def make_publisher(amqp_ns: AmqpNamespace) -> AsyncIterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(url: str | None = None, **kwargs: Any) -> Publisher:
        kwargs.setdefault("unrouted_exchange", amqp_ns.unrouted_exchange)
        publisher = Publisher(url or amqp_ns.url, **kwargs)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        await publisher.close()


async def started(publisher: Publisher) -> Publisher:
    await publisher.start()
    return publisher


@pytest.fixture
async def publisher(amqp_ns: AmqpNamespace) -> AsyncIterator[Publisher]:
    p = Publisher(amqp_ns.url, unrouted_exchange=amqp_ns.unrouted_exchange)
    await p.start()
    yield p
    await p.close()


# -- what arrives ---------------------------------------------------------------------------


async def test_properties_headers_body_and_order_arrive_as_given(
    publisher: Publisher, amqp_ns: AmqpNamespace
) -> None:
    messages = make_messages(amqp_ns, 200)
    collector = await amqp_ns.consume(messages[0].exchange, DOMAIN)

    result = await publisher.publish(messages)

    assert result.complete
    assert result.failed == ()
    assert result.confirmed == tuple(messages)
    received = await collector.wait_for(len(messages))
    assert ids(received) == ids(messages)
    for sent, got in zip(messages, received, strict=True):
        assert got.body == sent.body
        assert got.message_id == sent.message_id
        assert got.type == sent.type
        assert got.timestamp == sent.timestamp
        assert got.headers == dict(sent.headers)
        assert got.content_type == "application/json"
        assert got.app_id == "bitrix24-bridge"
        assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert got.routing_key == DOMAIN
        assert got.exchange == sent.exchange


async def test_app_id_and_missing_timestamp(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    publisher = await started(make_publisher(app_id="bridge-test"))
    try:
        message = make_messages(amqp_ns, 1)[0]
        bare = dataclasses.replace(message, timestamp=None, headers={})
        collector = await amqp_ns.consume(bare.exchange)
        assert (await publisher.publish([bare])).complete
        (got,) = await collector.wait_for(1)
        assert got.app_id == "bridge-test"
        assert got.timestamp is None
        assert got.headers == {}
    finally:
        await publisher.close()


async def test_duplicate_message_ids_in_one_publish_keep_order(
    publisher: Publisher, amqp_ns: AmqpNamespace
) -> None:
    first = make_messages(amqp_ns, 3)
    again = dataclasses.replace(first[0], key="again")
    batch = [*first, again, *make_messages(amqp_ns, 2, start=10)]
    collector = await amqp_ns.consume(first[0].exchange)

    result = await publisher.publish(batch)

    assert result.confirmed == tuple(batch)
    assert [m.body for m in await collector.wait_for(len(batch))] == [m.body for m in batch]


# -- exchanges ------------------------------------------------------------------------------


async def test_exchange_is_durable_topic_with_alternate_and_unrouted_is_kept(
    publisher: Publisher, amqp_ns: AmqpNamespace
) -> None:
    # Nobody bound anything: the publisher declares the exchange, the message goes to the
    # alternate exchange and is confirmed because the unrouted queue stored it.
    messages = make_messages(amqp_ns, 3, event="ONTASKADD")
    exchange = messages[0].exchange

    result = await publisher.publish(messages)

    assert result.confirmed == tuple(messages)
    unrouted = await amqp_ns.consume_queue(amqp_ns.unrouted_exchange)
    assert ids(await unrouted.wait_for(3)) == ids(messages)

    channel = await amqp_ns.channel()
    # An equivalent declaration succeeds; any difference in type, durability or arguments
    # is refused by the broker (406), which proves what the publisher declared.
    await channel.declare_exchange(
        exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": amqp_ns.unrouted_exchange},
    )
    for kind, durable, alternate in [
        (aio_pika.ExchangeType.FANOUT, True, amqp_ns.unrouted_exchange),
        (aio_pika.ExchangeType.TOPIC, False, amqp_ns.unrouted_exchange),
        (aio_pika.ExchangeType.TOPIC, True, "other"),
    ]:
        channel = await amqp_ns.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_exchange(
                exchange, kind, durable=durable, arguments={"alternate-exchange": alternate}
            )

    channel = await amqp_ns.channel()
    await channel.declare_exchange(
        amqp_ns.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await channel.declare_exchange(
            amqp_ns.unrouted_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
    channel = await amqp_ns.channel()
    await channel.declare_queue(amqp_ns.unrouted_exchange, durable=True)
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await channel.declare_queue(amqp_ns.unrouted_exchange, durable=False)


async def test_declare_false_missing_exchange_fails_and_is_reported(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    reasons: list[str] = []
    publisher = await started(make_publisher(declare=False, on_failure=reasons.append))
    try:
        assert publisher.connected
        assert amqp_ns.unrouted_exchange in (publisher.problem or "")

        present = make_messages(amqp_ns, 2, event="ONPRESENT")
        absent = make_messages(amqp_ns, 3, event="ONABSENT", start=10)
        await amqp_ns.declare_exchange(present[0].exchange)
        collector = await amqp_ns.consume(present[0].exchange, declare_exchange=False)

        result = await publisher.publish([*present, *absent])

        assert result.confirmed == tuple(present)
        assert result.failed == tuple((m, "missing_exchange") for m in absent)
        assert reasons == ["missing_exchange"] * 3
        assert absent[0].exchange in (publisher.problem or "")
        assert ids(await collector.wait_for(2)) == ids(present)
        assert publisher.connected  # a failed passive declare must not cost the connection

        # Someone else declares them: the same publisher now delivers.
        channel = await amqp_ns.channel()
        await channel.declare_exchange(
            amqp_ns.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await amqp_ns.declare_exchange(absent[0].exchange)
        late = await amqp_ns.consume(absent[0].exchange, declare_exchange=False)

        result = await publisher.publish(absent)

        assert result.confirmed == tuple(absent)
        assert ids(await late.wait_for(3)) == ids(absent)
        assert publisher.problem is None
    finally:
        await publisher.close()


async def test_declare_false_never_creates_exchanges(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    publisher = await started(make_publisher(declare=False))
    try:
        messages = make_messages(amqp_ns, 1, event="ONNEVER")
        assert not (await publisher.publish(messages)).complete
    finally:
        await publisher.close()
    channel = await amqp_ns.channel()
    for name in (messages[0].exchange, amqp_ns.unrouted_exchange):
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(name, passive=True)
        channel = await amqp_ns.channel()


async def test_exchange_deleted_behind_our_back_is_declared_again(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    changes: list[bool] = []
    publisher = await started(make_publisher(on_connection_change=changes.append))
    messages = make_messages(amqp_ns, 3)
    assert (await publisher.publish(messages[:1])).complete
    channel = await amqp_ns.channel()
    await channel.exchange_delete(messages[0].exchange)

    result = await publisher.publish(messages[1:2])

    assert result.failed == ((messages[1], "missing_exchange"),)
    # The broker closed the publishing channel (404); the publisher opens a new one.
    await until(holds(lambda: changes == [True, False, True]), "a new channel", timeout=10)
    assert (await publisher.publish(messages[2:])).confirmed == (messages[2],)
    await amqp_ns.declare_exchange(messages[0].exchange, passive=True)


async def test_start_refuses_an_unrouted_exchange_declared_differently(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    channel = await amqp_ns.channel()
    await channel.declare_exchange(
        amqp_ns.unrouted_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    publisher = make_publisher()

    with pytest.raises(ExchangeMissing, match=re.escape(amqp_ns.unrouted_exchange)):
        await publisher.start()
    assert not publisher.connected


# -- failures -------------------------------------------------------------------------------


async def test_nack_fails_exactly_the_rejected_messages(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    reasons: list[str] = []
    publisher = await started(make_publisher(on_failure=reasons.append))
    try:
        ok = make_messages(amqp_ns, 5, routing_key="ok")
        full = make_messages(amqp_ns, 5, routing_key="full", start=100)
        exchange = ok[0].exchange
        # A queue that is always full and refuses instead of dropping: the broker nacks.
        await amqp_ns.declare_queue(
            exchange, "full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        collector = await amqp_ns.consume(exchange, "ok")
        batch = [m for pair in zip(ok, full, strict=True) for m in pair]

        result = await publisher.publish(batch)

        assert result.confirmed == tuple(ok)
        assert sorted(ids(m for m, _ in result.failed)) == sorted(ids(full))
        assert {reason for _, reason in result.failed} == {"nack"}
        assert not result.complete
        assert reasons == ["nack"] * 5
        assert ids(await collector.wait_for(5)) == ids(ok)
    finally:
        await publisher.close()


async def test_returned_message_is_not_confirmed(
    publisher: Publisher, amqp_ns: AmqpNamespace
) -> None:
    # Without its alternate exchange an unroutable mandatory message comes back (basic.return)
    # and is then acked: it must still be a failure.
    routed = make_messages(amqp_ns, 2, routing_key="bound")
    lost = make_messages(amqp_ns, 2, routing_key="nobody", start=50)
    collector = await amqp_ns.consume(routed[0].exchange, "bound")
    channel = await amqp_ns.channel()
    await channel.exchange_delete(amqp_ns.unrouted_exchange)

    result = await publisher.publish([routed[0], lost[0], routed[1], lost[1]])

    assert result.confirmed == tuple(routed)
    assert result.failed == tuple((m, "returned") for m in lost)
    assert ids(await collector.wait_for(2)) == ids(routed)


async def test_cut_mid_publish_never_reports_a_missing_message_as_confirmed(
    make_publisher: Callable[..., Publisher],
    amqp_ns: AmqpNamespace,
    amqp_proxy: TcpProxy,
    amqp_url: str,
) -> None:
    changes: list[bool] = []
    publisher = await started(
        make_publisher(amqp_proxy.url(amqp_url), on_connection_change=changes.append)
    )
    try:
        messages = make_messages(amqp_ns, 5000, padding=200)
        # The observer reads straight from the broker, not through the proxy.
        collector = await amqp_ns.consume(messages[0].exchange)
        assert (await publisher.publish(messages[:1])).complete  # exchange declared and cached
        await collector.wait_for(1)
        total = sum(len(m.body) for m in messages)

        # A few hundred messages reach the broker, then it stays unreachable for a while.
        amqp_proxy.cut_after(total // 10, then_pause=True)
        result = await publisher.publish(messages)

        assert len(result.confirmed) + len(result.failed) == len(messages)
        assert result.failed, "the cut happened after everything was confirmed"
        assert {reason for _, reason in result.failed} == {"connection"}
        confirmed = set(ids(result.confirmed))
        assert ids(result.confirmed) == [
            m.message_id for m in messages if m.message_id in confirmed
        ]
        stored = set(ids(await collector.settle(quiet=1.0)))
        missing = [m.message_id for m in result.confirmed if m.message_id not in stored]
        assert missing == [], f"{len(missing)} confirmed messages are not in the broker"
        assert len(stored) < len(messages)  # really cut mid-publish

        assert not publisher.connected
        assert changes == [True, False]
        assert "connection closed" in (publisher.problem or "")
        failed_fast = await asyncio.wait_for(publisher.publish(messages[:3]), 2)
        assert [reason for _, reason in failed_fast.failed] == ["connection"] * 3

        amqp_proxy.resume()
        assert await publisher.wait_connected(15)
        assert publisher.problem is None
        again = make_messages(amqp_ns, 20, start=9000)
        result = await publisher.publish(again)
        assert result.confirmed == tuple(again)
        assert changes[:3] == [True, False, True]
    finally:
        await publisher.close()


async def test_confirm_timeout_when_broker_goes_silent(
    make_publisher: Callable[..., Publisher],
    amqp_ns: AmqpNamespace,
    amqp_proxy: TcpProxy,
    amqp_url: str,
) -> None:
    reasons: list[str] = []
    publisher = await started(
        make_publisher(amqp_proxy.url(amqp_url), confirm_timeout=1.0, on_failure=reasons.append)
    )
    try:
        messages = make_messages(amqp_ns, 10)
        collector = await amqp_ns.consume(messages[0].exchange)
        assert (await publisher.publish(messages[:1])).complete

        amqp_proxy.pause()
        loop = asyncio.get_running_loop()
        began = loop.time()
        result = await publisher.publish(messages[1:])
        elapsed = loop.time() - began

        assert result.confirmed == ()
        assert result.failed == tuple((m, "timeout") for m in messages[1:])
        assert reasons == ["timeout"] * 9
        assert 0.9 <= elapsed < 5
        assert publisher.connected  # silence is not (yet) a lost connection

        # Late confirmations after the timeout are ignored; the publisher keeps working.
        amqp_proxy.resume()
        await collector.wait_for(10)
        more = make_messages(amqp_ns, 3, start=100)
        assert (await publisher.publish(more)).confirmed == tuple(more)
    finally:
        await publisher.close()


def _rabbitmqctl_eval(expression: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression], check=True, capture_output=True, timeout=60
    )
    return done.stdout.decode().strip()


@pytest.mark.serial
@pytest.mark.slow
async def test_blocked_connection_waits_and_times_out_without_losing_the_connection(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    # A memory alarm blocks every publishing connection of the node; keep the window short.
    publisher = await started(make_publisher(confirm_timeout=2.0))
    messages = make_messages(amqp_ns, 6)
    collector = await amqp_ns.consume(messages[0].exchange)
    assert (await publisher.publish(messages[:1])).complete
    saved = _rabbitmqctl_eval("vm_memory_monitor:get_vm_memory_high_watermark().")
    _rabbitmqctl_eval("vm_memory_monitor:set_vm_memory_high_watermark({absolute, 1}).")
    try:
        alarm = holds(lambda: "memory" in _rabbitmqctl_eval("rabbit_alarm:get_alarms()."))
        await until(alarm, "the memory alarm", timeout=15)
        result = await publisher.publish(messages[1:])
    finally:
        _rabbitmqctl_eval(f"vm_memory_monitor:set_vm_memory_high_watermark({saved}).")

    assert result.confirmed == ()
    assert {reason for _, reason in result.failed} == {"timeout"}
    assert publisher.connected
    # Once unblocked, the held messages go through and the publisher carries on.
    await collector.wait_for(6, timeout=20)
    more = make_messages(amqp_ns, 2, start=50)
    assert (await publisher.publish(more)).confirmed == tuple(more)


async def test_start_against_closed_port_raises_broker_unavailable_without_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    password = "s3cret-Pa55word"
    changes: list[bool] = []
    publisher = Publisher(
        f"amqp://bridge:{password}@127.0.0.1:{port}/vh",
        unrouted_exchange="unrouted",
        on_connection_change=changes.append,
    )

    with pytest.raises(BrokerUnavailable) as caught:
        await publisher.start()

    text = str(caught.value)
    assert password not in text
    assert "\n" not in text
    assert f"127.0.0.1:{port}" in text
    assert not publisher.connected
    assert publisher.problem is not None
    assert changes == []
    result = await publisher.publish(make_messages(AmqpNamespace("amqp://x", "t"), 2))
    assert [reason for _, reason in result.failed] == ["connection"] * 2
    await publisher.close()


async def test_publish_result_complete_only_when_everything_confirmed() -> None:
    message = make_messages(AmqpNamespace("amqp://x", "t"), 1)[0]
    assert PublishResult((message,), ()).complete
    assert PublishResult((), ()).complete
    assert not PublishResult((), ((message, "nack"),)).complete


# -- no second copy, no swapped outcome -------------------------------------------------------


async def test_a_stall_longer_than_the_confirm_timeout_stores_one_copy_per_message(
    make_publisher: Callable[..., Publisher],
    amqp_ns: AmqpNamespace,
    amqp_proxy: TcpProxy,
    amqp_url: str,
) -> None:
    # The broker goes silent while messages are on their way; every retry during the stall
    # times out. A retry must wait for the first copy's outcome instead of sending another.
    publisher = await started(make_publisher(amqp_proxy.url(amqp_url), confirm_timeout=0.5))
    messages = make_messages(amqp_ns, 20)
    collector = await amqp_ns.consume(messages[0].exchange)
    assert (await publisher.publish(messages[:1])).complete
    await collector.wait_for(1)

    amqp_proxy.pause()
    for _ in range(3):
        result = await publisher.publish(messages[1:])
        assert result.confirmed == ()
        assert {reason for _, reason in result.failed} == {"timeout"}
    amqp_proxy.resume()

    # Once the broker answers, the retry learns the first copy was stored: confirmed, unsent.
    await until(holds(lambda: len(collector.messages) >= 20), "the first copies", timeout=10)
    sent_before = amqp_proxy.bytes_up
    result = await publisher.publish(messages[1:])
    assert result.confirmed == tuple(messages[1:])
    assert amqp_proxy.bytes_up == sent_before  # nothing was sent again
    stored = ids(await collector.settle(quiet=0.5))
    assert sorted(stored) == sorted(ids(messages)), "a message was stored twice or lost"


async def test_same_message_id_in_flight_twice_never_swaps_a_return_into_a_confirm(
    make_publisher: Callable[..., Publisher], amqp_ns: AmqpNamespace
) -> None:
    # Two publishes of one message_id at once: one to an exchange that returns it (no alternate
    # exchange, no queue), one to an exchange with a queue. aiormq matches basic.return by
    # message_id, so without care the return lands on the other publish and the returned copy
    # is reported confirmed although the broker holds nothing of it.
    channel = await amqp_ns.channel()
    returning = f"{amqp_ns.prefix}.returning"
    await channel.declare_exchange(returning, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(
        amqp_ns.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    publisher = await started(make_publisher(declare=False))
    (template,) = make_messages(amqp_ns, 1)
    routed_exchange = template.exchange
    collector = await amqp_ns.consume(routed_exchange)
    lost = dataclasses.replace(template, exchange=returning)

    for _ in range(5):
        first, second = await asyncio.gather(
            publisher.publish([lost]), publisher.publish([template])
        )
        assert first.failed == ((lost, "returned"),)
        assert second.confirmed == (template,)
    assert len(await collector.settle(quiet=0.5)) == 5


async def test_after_a_return_the_unrouted_path_is_declared_again(
    publisher: Publisher, amqp_ns: AmqpNamespace
) -> None:
    lost = make_messages(amqp_ns, 3, routing_key="nobody")
    channel = await amqp_ns.channel()
    await channel.queue_delete(amqp_ns.unrouted_exchange)  # someone deletes the unrouted queue

    first = await publisher.publish(lost)
    assert {reason for _, reason in first.failed} == {"returned"}

    again = await publisher.publish(lost)
    assert again.confirmed == tuple(lost)
    assert await amqp_ns.message_count(amqp_ns.unrouted_exchange) == 3
