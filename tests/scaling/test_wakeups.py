"""Wake-ups between replicas over LISTEN/NOTIFY: real PostgreSQL, two connections."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from yarl import URL

from bridge.core.errors import StateError
from bridge.scaling.wakeups import Wakeup, WakeupListener, forward, parse
from tests.harness import free_port, until
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds


def channel() -> str:
    return f"wakeup_{uuid.uuid4().hex[:8]}"  # tests share a database: one channel each


class Heard:
    """A listener on a channel of its own, what it heard, and a second connection to send."""

    def __init__(self, listener: WakeupListener, name: str, sender: psycopg.AsyncConnection[Any]):
        self.listener, self.name, self.sender = listener, name, sender
        self.wakeups: list[Wakeup] = []

    async def send(self, wakeup: Wakeup) -> None:
        await forward(self.sender, wakeup, channel=self.name)


@pytest.fixture
async def heard(pg_url: str) -> AsyncIterator[Heard]:
    name = channel()
    wakeups: list[Wakeup] = []
    listener = WakeupListener(pg_url, wakeups.append, channel=name)
    await listener.start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
            rig = Heard(listener, name, sender)
            rig.wakeups = wakeups
            yield rig
    finally:
        await listener.stop()


async def test_a_wakeup_sent_on_one_connection_reaches_the_listener(heard: Heard) -> None:
    await heard.send(Wakeup("m-1", 1700000000.5))
    await heard.send(Wakeup("m-2"))
    await forward(heard.sender, Wakeup("m-3"), channel="another_channel")
    await until(holds(lambda: len(heard.wakeups) >= 2), "two wake-ups")
    assert heard.wakeups == [Wakeup("m-1", 1700000000.5), Wakeup("m-2", None)]


async def test_a_wakeup_inside_a_transaction_is_sent_on_commit_only(heard: Heard) -> None:
    async with heard.sender.transaction(force_rollback=True):
        await heard.send(Wakeup("rolled-back"))
    await heard.send(Wakeup("committed"))
    await until(holds(lambda: len(heard.wakeups) >= 1), "the committed wake-up")
    assert heard.wakeups == [Wakeup("committed")]


async def test_malformed_payloads_are_ignored_and_bad_input_sends_nothing(heard: Heard) -> None:
    for bad in ("not json", '{"member_id": ""}', '["m"]', '{"member_id": "m", "ts": "x"}'):
        await heard.sender.execute("SELECT pg_notify(%s, %s)", (heard.name, bad))
    for member_id in ("", "x" * 101, "line\nbreak"):
        with pytest.raises(ValueError, match="member id"):
            await heard.send(Wakeup(member_id))
    await heard.send(Wakeup("m-ok"))
    await until(holds(lambda: len(heard.wakeups) >= 1), "the good wake-up")
    assert heard.wakeups == [Wakeup("m-ok")]
    assert heard.listener.rejected == 4


def test_parse_round_trip() -> None:
    assert parse('{"member_id":"abc","ts":12.5}') == Wakeup("abc", 12.5)
    assert parse('{"member_id":"abc"}') is None  # ts is always sent, null when unknown
    assert parse('{"member_id":"abc","ts":1e999}') is None


async def test_the_listener_comes_back_after_its_connection_is_cut(pg_url: str) -> None:
    name = channel()
    heard: list[Wakeup] = []
    gaps: list[bool] = []
    async with TcpProxy(target_port=5432) as proxy:
        listener = WakeupListener(
            proxy.url(pg_url),
            heard.append,
            on_gap=lambda: gaps.append(True),
            channel=name,
            probe_every=0.5,
            retry_after=0.1,
        )
        await listener.start()
        try:
            assert proxy.cut() == 1
            await until(holds(lambda: listener.reconnects >= 1), "a reconnect")
            assert gaps == [True] * listener.reconnects
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
                await forward(sender, Wakeup("after-cut"), channel=name)
            await until(holds(lambda: Wakeup("after-cut") in heard), "the wake-up after the cut")
        finally:
            await listener.stop()


async def test_an_unreachable_database_fails_start_with_one_line(pg_url: str) -> None:
    dead = str(URL(pg_url).with_port(free_port()).with_password("hunter2"))
    listener = WakeupListener(dead, lambda w: None)
    with pytest.raises(StateError, match="cannot listen") as caught:
        await listener.start()
    assert "hunter2" not in str(caught.value)
