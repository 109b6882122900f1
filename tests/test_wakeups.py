"""Wake-ups between replicas over LISTEN/NOTIFY: real PostgreSQL, two connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest
from yarl import URL

from bridge.errors import StateError
from bridge.wakeups import Wakeup, WakeupListener, forward, parse
from tests.harness import free_port
from tests.plugins.tcpproxy import TcpProxy


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def channel() -> str:
    return f"wakeup_{uuid.uuid4().hex[:8]}"  # tests share a database: one channel each


async def test_a_wakeup_sent_on_one_connection_reaches_the_listener(pg_url: str) -> None:
    name = channel()
    heard: list[Wakeup] = []
    listener = WakeupListener(pg_url, heard.append, channel=name)
    await listener.start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
            await forward(sender, Wakeup("m-1", 1700000000.5), channel=name)
            await forward(sender, Wakeup("m-2"), channel=name)
            await forward(sender, Wakeup("m-3"), channel="another_channel")
        await eventually(lambda: len(heard) >= 2, "two wake-ups")
        assert heard == [Wakeup("m-1", 1700000000.5), Wakeup("m-2", None)]
    finally:
        await listener.stop()


async def test_a_wakeup_inside_a_transaction_is_sent_on_commit_only(pg_url: str) -> None:
    name = channel()
    heard: list[Wakeup] = []
    listener = WakeupListener(pg_url, heard.append, channel=name)
    await listener.start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
            async with sender.transaction(force_rollback=True):
                await forward(sender, Wakeup("rolled-back"), channel=name)
            await forward(sender, Wakeup("committed"), channel=name)
        await eventually(lambda: len(heard) >= 1, "the committed wake-up")
        assert heard == [Wakeup("committed")]
    finally:
        await listener.stop()


async def test_malformed_payloads_are_ignored_and_bad_input_sends_nothing(pg_url: str) -> None:
    name = channel()
    heard: list[Wakeup] = []
    listener = WakeupListener(pg_url, heard.append, channel=name)
    await listener.start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
            for bad in ("not json", '{"member_id": ""}', '["m"]', '{"member_id": "m", "ts": "x"}'):
                await sender.execute("SELECT pg_notify(%s, %s)", (name, bad))
            for member_id in ("", "x" * 101, "line\nbreak"):
                with pytest.raises(ValueError, match="member id"):
                    await forward(sender, Wakeup(member_id), channel=name)
            await forward(sender, Wakeup("m-ok"), channel=name)
        await eventually(lambda: len(heard) >= 1, "the good wake-up")
        assert heard == [Wakeup("m-ok")]
        assert listener.rejected == 4
    finally:
        await listener.stop()


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
            await eventually(lambda: listener.reconnects >= 1, "a reconnect")
            assert gaps == [True] * listener.reconnects
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as sender:
                await forward(sender, Wakeup("after-cut"), channel=name)
            await eventually(lambda: Wakeup("after-cut") in heard, "the wake-up after the cut")
        finally:
            await listener.stop()


async def test_an_unreachable_database_fails_start_with_one_line(pg_url: str) -> None:
    dead = str(URL(pg_url).with_port(free_port()).with_password("hunter2"))
    listener = WakeupListener(dead, lambda w: None)
    with pytest.raises(StateError, match="cannot listen") as caught:
        await listener.start()
    assert "hunter2" not in str(caught.value)
