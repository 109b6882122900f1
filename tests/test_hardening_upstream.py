"""Hostile upstream answers: a corrupted reservation never publishes or clears a damaged event,
and nothing is lost once the answers are whole again.

A corrupting transport sits between the bridge and the emulator (``transport=`` of the app, the
seam the service offers): it forwards every request over HTTP and, while ``active``, corrupts
each answer that carries ``event.offline.get`` results. While it does, no damaged event may be
published, a damaged answer clears nothing, and every reserved event stays journaled; the
undamaged events of a page may go through (one bad row must not hold a portal). Once it stops,
every event arrives and the portal queue and journal end empty. (Parking after repeated
failures is tested in ``tests/bitrix24/test_poison*.py``; here the attempts are unlimited.)

Checked by breaking the code on purpose (then restored): with ``messages.to_message`` accepting
any ``MESSAGE_ID`` the ``short_message_id`` case publishes during corruption and fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace

GET = "event.offline.get"
CLEAR = "event.offline.clear"


def _first_events(result: Any, change: Callable[[dict[str, Any]], None]) -> Any:
    if isinstance(result, dict) and isinstance(result.get("events"), list) and result["events"]:
        change(result["events"][0])
    return result


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(event: dict[str, Any]) -> None:
        event[key] = value

    return change


def _pop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(event: dict[str, Any]) -> None:
        event.pop(key, None)

    return change


# How each mode corrupts one event.offline.get result (None: the whole answer, see below).
RESULT_CORRUPTIONS: dict[str, Callable[[Any], Any] | None] = {
    "truncated_json": None,
    "html_502": None,
    "result_wrong_type": lambda result: "events" if isinstance(result, dict) else [result],
    "events_not_a_list": lambda result: (
        {**result, "events": {"0": 1}} if isinstance(result, dict) else result
    ),
    "id_is_a_list": lambda r: _first_events(r, lambda e: e.update(ID=[e.get("ID")])),
    "short_message_id": lambda r: _first_events(r, _set("MESSAGE_ID", "abc")),
    "no_event_name": lambda r: _first_events(r, _pop("EVENT_NAME")),
    "event_not_an_object": lambda r: (
        {**r, "events": ["x", *r["events"][1:]]} if isinstance(r, dict) and r.get("events") else r
    ),
}


class CorruptingTransport(httpx.AsyncBaseTransport):
    """Forwards to the emulator; while ``active`` corrupts every answer with a reservation."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.inner = httpx.AsyncHTTPTransport()
        self.active = False
        self.corrupted = 0
        self.clears_while_active = 0

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 1)[-1].removesuffix(".json")
        params: dict[str, Any] = {}
        if request.headers.get("content-type", "").startswith("application/json"):
            params = json.loads(request.content)
        commands = params.get("cmd") if method == "batch" else None
        called = list(commands.values()) if isinstance(commands, dict) else [method]
        if self.active and any(str(c).startswith(CLEAR) for c in called):
            self.clears_while_active += 1
        response = await self.inner.handle_async_request(request)
        if not self.active or not any(str(c).startswith(GET) for c in called):
            return response
        raw = await response.aread()
        await response.aclose()
        self.corrupted += 1
        headers = {"content-type": "application/json"}
        if self.mode == "truncated_json":
            return httpx.Response(200, content=raw[: len(raw) // 2], headers=headers)
        if self.mode == "html_502":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return httpx.Response(502, content=page, headers={"content-type": "text/html"})
        corrupt = RESULT_CORRUPTIONS[self.mode]
        assert corrupt is not None
        body = json.loads(raw)
        if method == "batch":
            assert isinstance(commands, dict)
            results = body["result"]["result"]
            for key in [k for k in results if str(commands[k]).startswith(GET)]:
                results[key] = corrupt(results[key])
        elif "result" in body:
            body["result"] = corrupt(body["result"])
        return httpx.Response(200, content=json.dumps(body).encode(), headers=headers)


@pytest.mark.parametrize("mode", sorted(RESULT_CORRUPTIONS))
async def test_corrupted_reservation_answer_stops_the_page_and_recovers(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path, mode: str
) -> None:
    _server, portal, port = emulated
    total = 120  # three pages of 50
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",
        BRIDGE_PAGE_SIZE="50",
        BRIDGE_POISON_ATTEMPTS="1000",
    )
    transport = CorruptingTransport(mode)
    async with bridge_in_process(env, transport=transport) as bridge:
        state = bridge.service.state
        assert state is not None
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()  # the startup pass is done: corrupt from here on
        transport.active = True
        await portal.generate("ONCRMLEADADD", total)  # notifies the bridge, which drains

        async def held_safely() -> bool:
            queue = await portal.queue()
            reserved: dict[str, int] = queue["reserved"]
            journal = {p for _m, _c, p in await state.journal_all()}
            # Corrupted at least twice (the reservation, then its recovery), and every
            # reservation the portal holds is in the journal.
            return transport.corrupted >= 2 and bool(reserved) and set(reserved) <= journal

        await until(held_safely, "the reserved pages to be journaled")
        whole_answers = mode in ("truncated_json", "html_502", "result_wrong_type")
        if whole_answers or mode == "events_not_a_list":
            # Nothing readable came back: nothing published, nothing cleared.
            assert transport.clears_while_active == 0
            assert collector.messages == [], "a page with a corrupted answer was published"
        for message in collector.messages:
            event = json.loads(message.body)
            assert event["MESSAGE_ID"] != "abc"
            assert "EVENT_NAME" in event
            assert isinstance(event["ID"], str)
        assert session.drainer.last_error is not None
        assert session.drainer.stopped is None, "a bad answer must not stop the portal for good"

        transport.active = False
        await portal.wait_empty(timeout=60)
        await collector.wait_for(total, timeout=30)
        await collector.settle(quiet=0.3)
        journal = await state.journal_all()
    await transport.aclose()
    assert journal == []
    ids = set(collector.message_ids)
    assert len(ids) == total
    assert all(json.loads(m.body)["MESSAGE_ID"] != "abc" for m in collector.messages)
