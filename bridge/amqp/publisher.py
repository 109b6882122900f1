"""The aio-pika publisher: publish with confirms, report exactly what the broker acknowledged.

A message counts as confirmed only when the broker sent ``basic.ack`` for it. Everything else
(nack, return, no answer in time, lost connection, unusable exchange) is a failure with a reason,
never an exception, so the caller clears upstream only what is really stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec
from yarl import URL

from bridge.amqp.protocol import (
    FailureReason,
    OutgoingMessage,
    PublishResult,
    _confirm,
)
from bridge.core.errors import BridgeError, BrokerUnavailable

__all__ = [
    "AmqpPublisher",
    "BrokerUnavailable",
    "ExchangeMissing",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# AMQP heartbeat in seconds, unless the URL sets one (?heartbeat=N). aiormq sends one every
# HEARTBEAT / 2 s and closes a connection that received nothing for (HEARTBEAT + 1) * 3 s, so a
# silent broker (a partition, not a closed socket) is noticed within about 20 s.
HEARTBEAT = 5
RECONNECT_BASE_DELAY = 0.25
RECONNECT_MAX_DELAY = 30.0
PERSISTENT = 2


class ExchangeMissing(BridgeError):
    """An exchange cannot be used: absent while declaring is off, or declared differently."""


def _acked(task: asyncio.Future[Any]) -> bool:
    return (
        not task.cancelled()
        and task.exception() is None
        and isinstance(task.result(), spec.Basic.Ack)
    )


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # Outcomes are read by the publisher; a late one nobody waits for must not be logged as
    # "exception never retrieved".
    if not task.cancelled():
        task.exception()


def redact_url(url: str) -> str:
    parsed = URL(url)
    if parsed.password:
        parsed = parsed.with_password("***")
    return str(parsed)


def with_heartbeat(url: str) -> str:
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=HEARTBEAT))


class AmqpPublisher:
    def __init__(
        self,
        url: str,
        *,
        unrouted_exchange: str,
        declare: bool = True,
        confirm_timeout: float = 30.0,
        app_id: str = "bitrix24-bridge",
        on_failure: Callable[[str], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._url = url
        self._password = URL(url).password or ""
        self._safe_url = redact_url(url)
        self._unrouted = unrouted_exchange
        self._declare = declare
        self._confirm_timeout = confirm_timeout
        self._app_id = app_id
        self._on_failure = on_failure
        self._on_connection_change = on_connection_change

        self._connection: AbstractConnection | None = None
        self._dead: AbstractConnection | None = None  # lost, still to be closed
        self._channel: AbstractChannel | None = None  # publisher confirms, never used to declare
        self._amqp: aiormq.Channel | None = None  # its aiormq channel
        self._declare_channel: AbstractChannel | None = None  # a 404/406 closes only this one
        self._declare_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._exchange_problems: dict[str, str] = {}
        # Publishes of the current channel whose outcome is not known yet, by message_id.
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._unrouted_suspect = False  # a message came back: re-declare the unrouted path

        self._connected = False
        self._connected_event = asyncio.Event()
        self._connection_problem: str | None = "not connected to the broker yet"
        self._recovery: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect once; the caller decides whether and when to retry.

        Raises ``BrokerUnavailable`` when the broker cannot be reached, ``ExchangeMissing`` when
        it refuses the unrouted exchange or queue (declared elsewhere with other settings).
        """
        self._closing = False
        try:
            await self._open()
        except aiormq.exceptions.ChannelClosed as exc:
            # The broker answered but refused the unrouted exchange or queue (e.g. declared
            # with other settings): a configuration problem, not an outage.
            raise ExchangeMissing(
                f"exchange {self._unrouted} unusable: {self._describe(exc)}"
            ) from exc
        except Exception as exc:
            raise BrokerUnavailable(
                f"RabbitMQ at {self._safe_url} is unavailable: {self._describe(exc)}"
            ) from exc

    async def close(self) -> None:
        self._closing = True
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            await asyncio.gather(recovery, return_exceptions=True)
        connection, self._connection = self._connection, None
        dead, self._dead = self._dead, None
        if dead is not None:
            with contextlib.suppress(Exception):
                await dead.close()
        self._channel = self._amqp = self._declare_channel = None
        self._declared.clear()
        for task in self._inflight.values():
            task.cancel()
        self._inflight = {}
        self._connection_problem = "publisher closed"
        self._set_connected(False)
        if connection is not None and not connection.is_closed:
            await connection.close()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def problem(self) -> str | None:
        if not self._connected:
            return self._connection_problem or "broker connection closed"
        if self._exchange_problems:
            return "; ".join(self._exchange_problems.values())
        return None

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 (public API)
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        (result,) = await self.publish_pages([messages])
        return result

    async def publish_pages(
        self, pages: Sequence[Sequence[OutgoingMessage]]
    ) -> list[PublishResult]:
        """Every page's messages in one pipelined run; one result (and proof) per page."""
        messages = [message for page in pages for message in page]
        confirmed, failed = await self._publish_all(messages)
        owners: dict[int, list[int]] = {}
        for index, page in enumerate(pages):
            for message in page:
                owners.setdefault(id(message), []).append(index)
        by_page_ok: list[list[OutgoingMessage]] = [[] for _ in pages]
        by_page_failed: list[list[tuple[OutgoingMessage, FailureReason]]] = [[] for _ in pages]
        for message in confirmed:
            by_page_ok[owners[id(message)].pop(0)].append(message)
        for message, reason in failed:
            by_page_failed[owners[id(message)].pop(0)].append((message, reason))
        return [
            PublishResult(tuple(ok), tuple(bad), _confirm(ok))
            for ok, bad in zip(by_page_ok, by_page_failed, strict=True)
        ]

    async def _publish_all(
        self, messages: Sequence[OutgoingMessage]
    ) -> tuple[list[OutgoingMessage], list[tuple[OutgoingMessage, FailureReason]]]:
        confirmed: list[OutgoingMessage] = []
        failed: list[tuple[OutgoingMessage, FailureReason]] = []
        if not messages:
            return confirmed, failed
        if self._amqp is None:
            failed = [(message, "connection") for message in messages]
            self._report(failed)
            return confirmed, failed

        unusable = await self._ensure_exchanges({m.exchange for m in messages})
        sendable: list[OutgoingMessage] = []
        for message in messages:
            reason = unusable.get(message.exchange)
            if reason is None:
                sendable.append(message)
            else:
                failed.append((message, reason))

        # A message whose earlier publish on this channel is still unresolved (a confirm that
        # timed out) is not sent again: its outcome is awaited instead. Sending it twice would
        # store it twice, and two publishes of one message_id in flight make aiormq match a
        # basic.return to the wrong one.
        todo = sendable
        while todo:
            todo = await self._settle_earlier(todo, confirmed, failed)
            # One message_id is never in flight twice on the channel: a repeat waits for the
            # next segment (and for the outcome of the first copy).
            cut, seen = len(todo), set()
            for index, message in enumerate(todo):
                if message.message_id in seen:
                    cut = index
                    break
                seen.add(message.message_id)
            await self._publish_segment(todo[:cut], confirmed, failed)
            todo = todo[cut:]

        self._report(failed)
        return confirmed, failed

    async def _settle_earlier(
        self,
        messages: list[OutgoingMessage],
        confirmed: list[OutgoingMessage],
        failed: list[tuple[OutgoingMessage, FailureReason]],
    ) -> list[OutgoingMessage]:
        """Answer from an earlier, unresolved publish where there is one; the rest to send."""
        inflight = self._inflight
        earlier = {inflight[m.message_id] for m in messages if m.message_id in inflight}
        if not earlier:
            return messages
        pending = {task for task in earlier if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=self._confirm_timeout)
        to_send: list[OutgoingMessage] = []
        for message in messages:
            task = inflight.get(message.message_id)
            if task is None:
                to_send.append(message)
            elif not task.done():
                failed.append((message, "timeout"))  # still unresolved: do not send it again
            elif _acked(task):
                inflight.pop(message.message_id, None)
                confirmed.append(message)  # the earlier copy is stored: this one is confirmed
            else:
                inflight.pop(message.message_id, None)
                to_send.append(message)
        return to_send

    def _report(self, failed: list[tuple[OutgoingMessage, FailureReason]]) -> None:
        if self._on_failure is None:
            return
        try:
            for _, reason in failed:
                self._on_failure(reason)
        except Exception:
            log.exception("on_failure callback failed")

    async def _publish_segment(
        self,
        messages: Sequence[OutgoingMessage],
        confirmed: list[OutgoingMessage],
        failed: list[tuple[OutgoingMessage, FailureReason]],
    ) -> None:
        if not messages:
            return
        channel = self._amqp
        if channel is None or channel.is_closed:
            failed.extend((message, "connection") for message in messages)
            return
        inflight = self._inflight

        # Tasks are created in order and each one queues its frames without suspending (the
        # channel lock is FIFO), so the broker receives the messages in order; confirmations
        # are awaited together afterwards.
        tasks = [
            asyncio.ensure_future(
                channel.basic_publish(
                    message.body,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    properties=spec.Basic.Properties(
                        content_type="application/json",
                        delivery_mode=PERSISTENT,
                        headers=dict(message.headers),
                        message_id=message.message_id,
                        timestamp=message.timestamp,
                        message_type=message.type,
                        app_id=self._app_id,
                    ),
                    mandatory=True,
                    wait=False,
                )
            )
            for message in messages
        ]
        for message, task in zip(messages, tasks, strict=True):
            inflight[message.message_id] = task
            task.add_done_callback(_consume_outcome)
        # A confirm that does not come in time is not cancelled: the broker may still store the
        # message, and a later publish of the same message waits for that outcome instead of
        # sending a second copy (see _settle_earlier).
        _, pending = await asyncio.wait(tasks, timeout=self._confirm_timeout)

        missing: set[str] = set()
        returned = False
        for message, task in zip(messages, tasks, strict=True):
            if task in pending:
                failed.append((message, "timeout"))
                continue
            if inflight.get(message.message_id) is task:
                del inflight[message.message_id]
            if task.cancelled():
                failed.append((message, "connection"))
            elif (exc := task.exception()) is not None:
                reason = self._classify(exc, message.exchange)
                if reason == "missing_exchange":
                    missing.add(message.exchange)
                returned = returned or reason == "returned"
                failed.append((message, reason))
            elif isinstance(task.result(), spec.Basic.Ack):
                confirmed.append(message)
            else:  # a returned message resolved without raising: still not stored
                returned = True
                failed.append((message, "returned"))

        if missing:
            # Deleted behind our back: declare again (or report it) on the next publish.
            self._declared.difference_update(missing)
        if returned:
            # With the alternate exchange in place nothing should come back: the unrouted
            # exchange, its queue or their binding is gone. Declare them again before retrying.
            self._declared.discard(self._unrouted)
            self._unrouted_suspect = True
        if pending:
            log.warning(
                "%d of %d messages not confirmed within %.1fs",
                len(pending),
                len(messages),
                self._confirm_timeout,
            )

    def _classify(self, exc: BaseException, exchange: str) -> FailureReason:
        # PublishError (basic.return) subclasses DeliveryError (basic.nack): test it first.
        if isinstance(exc, aiormq.exceptions.PublishError):
            return "returned"
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return "nack"
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity) and f"'{exchange}'" in str(exc):
            return "missing_exchange"
        return "connection"

    # -- exchanges -------------------------------------------------------------------------

    async def _ensure_exchanges(self, names: set[str]) -> dict[str, FailureReason]:
        """Declare (or with ``declare=False`` look up) exchanges not seen on this connection."""
        if self._unrouted_suspect:
            await self._check_unrouted()
        todo = names - self._declared
        if self._unrouted in self._exchange_problems:
            todo.add(self._unrouted)
        if not todo:
            return {}
        unusable: dict[str, FailureReason] = {}
        async with self._declare_lock:
            for name in sorted(todo):
                if name in self._declared:
                    continue
                reason = await self._declare_exchange(name)
                if reason is not None and name in names:
                    unusable[name] = reason
        return unusable

    async def _check_unrouted(self) -> None:
        """After a basic.return: declare the unrouted exchange, queue and binding again."""
        async with self._declare_lock:
            if not self._unrouted_suspect:
                return
            try:
                if self._declare:
                    await self._declare_unrouted()
                    log.warning("a message came back: unrouted exchange and queue declared again")
                else:
                    await self._declare_exchange(self._unrouted)
            except Exception as exc:
                log.warning("declaring the unrouted path failed: %s", self._describe(exc))
                return
            self._unrouted_suspect = False

    async def _declare_exchange(self, name: str) -> FailureReason | None:
        arguments: dict[str, Any] | None
        if name == self._unrouted:
            kind, arguments = aio_pika.ExchangeType.FANOUT, None
        else:
            kind, arguments = aio_pika.ExchangeType.TOPIC, {"alternate-exchange": self._unrouted}
        try:
            channel = await self._get_declare_channel()
            await channel.declare_exchange(
                name,
                kind,
                durable=True,
                arguments=arguments,
                passive=not self._declare,
                timeout=self._confirm_timeout,
            )
        except aiormq.exceptions.ChannelClosed as exc:
            # 404 (absent) or 406 (declared with other settings); only the declaring channel died.
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity) and not self._declare:
                problem = f"exchange {name} missing (BRIDGE_DECLARE=false)"
            else:
                problem = f"exchange {name} unusable: {self._describe(exc)}"
            if self._exchange_problems.get(name) != problem:
                log.error("%s", problem)
            self._exchange_problems[name] = problem
            return "missing_exchange"
        except TimeoutError:
            log.warning("declaring exchange %s timed out", name)
            return "timeout"
        except Exception as exc:
            log.warning("declaring exchange %s failed: %s", name, self._describe(exc))
            return "connection"
        self._declared.add(name)
        if self._exchange_problems.pop(name, None) is not None:
            log.info("exchange %s is usable again", name)
        return None

    async def _get_declare_channel(self) -> AbstractChannel:
        channel = self._declare_channel
        if channel is None or channel.is_closed:
            connection = self._connection
            if connection is None or connection.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("no broker connection")
            channel = await connection.channel(publisher_confirms=False)
            self._declare_channel = channel
        return channel

    # -- connection ------------------------------------------------------------------------

    async def _open(self) -> None:
        """Open what is missing: the connection, the channels, the unrouted exchange."""
        connection = self._connection
        if connection is None or connection.is_closed:
            connection = await aio_pika.connect(
                with_heartbeat(self._url),
                timeout=CONNECT_TIMEOUT,
                client_properties={"connection_name": self._app_id},
            )
            connection.close_callbacks.add(self._connection_closed)
            self._connection = connection
            self._declare_channel = None
            self._declared.clear()
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            amqp = await channel.get_underlay_channel()
            # Publishing goes straight to aiormq for basic_publish(wait=False); a return must
            # fail the confirmation instead of resolving it.
            if not isinstance(amqp, aiormq.Channel) or not amqp.on_return_raises:
                raise RuntimeError("unexpected aiormq channel: cannot detect returned messages")
            async with self._declare_lock:
                if self._declare:
                    await self._declare_unrouted()
                else:
                    await self._declare_exchange(self._unrouted)
        except BaseException:
            self._connection = None
            await connection.close()
            raise
        channel.close_callbacks.add(self._channel_closed)
        self._channel, self._amqp = channel, amqp
        self._inflight = {}  # outcomes of the old channel's publishes come from the old channel
        self._connection_problem = None
        log.info("connected to RabbitMQ at %s", self._safe_url)
        self._set_connected(True)

    async def _declare_unrouted(self) -> None:
        channel = await self._get_declare_channel()
        exchange = await channel.declare_exchange(
            self._unrouted,
            aio_pika.ExchangeType.FANOUT,
            durable=True,
            timeout=self._confirm_timeout,
        )
        queue = await channel.declare_queue(
            self._unrouted, durable=True, timeout=self._confirm_timeout
        )
        await queue.bind(exchange, timeout=self._confirm_timeout)
        self._declared.add(self._unrouted)
        self._exchange_problems.pop(self._unrouted, None)

    def _connection_closed(self, sender: Any, exc: BaseException | None) -> None:
        if self._closing or sender is not self._connection:
            return
        # aio-pika leaves an unexpectedly closed Connection looking open (is_closed stays
        # False until close() is called), so forget it here and close it during recovery.
        self._dead = self._connection
        self._connection = None
        self._lost(f"broker connection closed: {self._describe(exc)}")

    def _channel_closed(self, sender: Any, exc: BaseException | None) -> None:
        if self._closing or sender is not self._channel:
            return
        self._lost(f"broker channel closed: {self._describe(exc)}")

    def _lost(self, problem: str) -> None:
        # Everything unconfirmed on the old channel is failed by aiormq itself (its pending
        # confirmation futures get the close exception); here we only track state and recover.
        self._channel = self._amqp = None
        self._declared.clear()
        self._connection_problem = problem
        if self._connected:
            log.warning("%s", problem)
        self._set_connected(False)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        dead, self._dead = self._dead, None
        if dead is not None:
            with contextlib.suppress(Exception):
                await dead.close()
        attempt = 0
        while not self._closing:
            delay = min(RECONNECT_MAX_DELAY, RECONNECT_BASE_DELAY * 2**attempt)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                await self._open()
            except Exception as exc:
                self._connection_problem = f"cannot reconnect to broker: {self._describe(exc)}"
                log.warning("reconnect attempt %d failed: %s", attempt, self._describe(exc))
                continue
            if attempt > 1:
                log.info("reconnected after %d attempts", attempt)
            return

    def _set_connected(self, value: bool) -> None:
        if value:
            self._connected_event.set()
        else:
            self._connected_event.clear()
        if value == self._connected:
            return
        self._connected = value
        if self._on_connection_change is not None:
            try:
                self._on_connection_change(value)
            except Exception:
                log.exception("on_connection_change callback failed")

    def _describe(self, exc: BaseException | None) -> str:
        if exc is None:
            return "closed"
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}"
