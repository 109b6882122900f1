"""The offline queue's own guarantees, driven directly (no webhook, no poll ticks), against the
emulator over HTTP and the real RabbitMQ: what needs real sockets, a real broker or the drain
loop. The rules of one pass, in process and on the in-memory publisher, are in
``test_offline_queue.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.amqp.publisher import AmqpPublisher
from bridge.bitrix24.messages import Routing
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.offline_queue import OfflineQueue
from bridge.bitrix24.upstream import PortalClient
from bridge.core.drainer import Drainer
from bridge.metrics import Metrics
from bridge.state import Portal, State
from tests.bitrix24.test_tokens import _refresh
from tests.harness import until
from tests.plugins.broker import AmqpNamespace
from tests.plugins.emulator import EmulatorFactory
from tests.waiting import holds


@dataclass
class Rig:
    queue: OfflineQueue
    client: PortalClient
    state: State
    publisher: AmqpPublisher
    http: httpx.AsyncClient
    control: httpx.AsyncClient


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    emulator_factory: EmulatorFactory, amqp_ns: AmqpNamespace, tmp_path: Path
) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def make(transport: httpx.AsyncBaseTransport | None = None, **queue_kw: Any) -> Rig:
        server = emulator_factory(auto_bind=True, rate_limit=None)
        # Idle connections are dropped after 1 s, before uvicorn's own keep-alive timeout (5 s,
        # uvicorn/config.py) can close one under a request: httpx's default expiry is 5 s too
        # (https://www.python-httpx.org/advanced/resource-limits).
        control = httpx.AsyncClient(
            base_url=server.base_url, limits=httpx.Limits(keepalive_expiry=1.0)
        )
        app = (await control.get("/_emulator/app")).json()
        grant = await _refresh(server.base_url, app, app["refresh_token"])
        state = await State.open(str(tmp_path / f"s{len(rigs)}.sqlite3"))
        portal = Portal(
            member_id=app["member_id"],
            domain=app["domain"],
            client_endpoint=app["client_endpoint"],
            access_token=grant["access_token"],
            refresh_token=grant["refresh_token"],
            application_token=app["application_token"],
        )
        http = httpx.AsyncClient(transport=transport)
        oauth = OAuthClient(
            http,
            oauth_url=app["oauth_url"],
            client_id=app["client_id"],
            client_secret=app["client_secret"],
        )
        client = PortalClient(
            portal,
            http=http,
            oauth=oauth,
            save=state.save_portal,
            metrics=Metrics(),
            rate_limit=100,
            rate_burst=100,
        )
        publisher = AmqpPublisher(amqp_ns.url, unrouted_exchange=amqp_ns.unrouted_exchange)
        await publisher.start()
        routing = Routing(
            exchange_template=amqp_ns.exchange_template,
            routing_key_template="{domain}",
            member_id=portal.member_id,
            domain=portal.domain,
            connector="",
        )
        queue = OfflineQueue(
            client,
            state=state,
            publisher=publisher,
            routing=routing,
            metrics=Metrics(),
            page_size=50,
            **queue_kw,
        )
        rig = Rig(queue, client, state, publisher, http, control)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.publisher.close()
        await rig.http.aclose()
        await rig.control.aclose()
        await rig.state.close()


class AbandoningTransport(httpx.AsyncBaseTransport):
    """The first reservation request gets no answer (a client-side timeout) but reaches the
    portal later, when the test releases it: the portal reserves rows nobody hears about."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.held: httpx.Request | None = None
        self.release = asyncio.Event()
        self.executed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.held is None and b"event.offline.get" in request.content:
            self.held = request
            self._task = asyncio.create_task(self._later(request))
            raise httpx.ReadTimeout("no answer in time", request=request)
        return await self.inner.handle_async_request(request)

    async def _later(self, request: httpx.Request) -> None:
        await self.release.wait()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        await response.aclose()
        self.executed.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.inner.aclose()


async def test_an_abandoned_reservation_is_found_without_a_poll_tick(
    make_rig: MakeRig, amqp_ns: AmqpNamespace
) -> None:
    transport = AbandoningTransport()
    rig: Rig = await make_rig(transport, abandon_grace=3.0)
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    drainer = Drainer(rig.queue, metrics=Metrics(), backoff_base=0.2, backoff_cap=0.5)
    drainer.start()
    try:
        # The abandoned pass, then one that finds the queue empty.
        settled = holds(
            lambda: drainer.passes >= 2 and drainer.idle.is_set() and drainer.failures == 0
        )
        await until(settled, "a pass after the abandoned one", timeout=10)
        assert transport.held is not None
        assert drainer.passes >= 2
        passes = drainer.passes
        # Events arrive without a notification, and the lost request runs only now.
        events = [{"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": str(n)}}} for n in range(10)]
        await rig.control.post("/_emulator/events", json={"events": events})
        transport.release.set()
        await asyncio.wait_for(transport.executed.wait(), 10)
        queue = (await rig.control.get("/_emulator/queue")).json()
        assert sum(queue["reserved"].values()) == 10  # the orphan exists now

        # No tick, no notification: the bridge still comes back for it.
        await collector.wait_for(10, timeout=20)
        assert drainer.passes > passes
    finally:
        await drainer.stop(1)
        await transport.aclose()
    queue = (await rig.control.get("/_emulator/queue")).json()
    assert queue["reserved"] == {}
    assert queue["free"] == 0
    assert sorted(json.loads(m.body)["EVENT_DATA"]["FIELDS"]["ID"] for m in collector.messages) == [
        str(n) for n in range(10)
    ]


async def _reserve_directly(rig: Rig, pages: int) -> list[str]:
    """Reservations made behind the bridge's back: orphans, as far as it knows."""
    found = []
    for _ in range(pages):
        answer = await rig.client.call(
            "event.offline.get", {"clear": 0, "limit": 50}, idempotent=False
        )
        found.append(answer.result["process_id"])
    return found


async def _calls(rig: Rig, method: str) -> int:
    counts = (await rig.control.get("/_emulator/calls")).json()
    return int(counts.get(method, 0))


async def test_the_orphan_scan_is_bounded_per_pass_and_resumes(
    make_rig: MakeRig, amqp_ns: AmqpNamespace
) -> None:
    from bridge.bitrix24.orphans import PAGES_PER_PASS

    rig: Rig = await make_rig()
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    rows = 50 * PAGES_PER_PASS * 2 + 400  # more reserved rows than two passes look at
    events = [{"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": str(n)}}} for n in range(rows)]
    await rig.control.post("/_emulator/events", json={"events": events})
    orphans = await _reserve_directly(rig, rows // 50)
    found: list[str] = []
    steps = 0
    while rig.queue.orphans.suspected:
        before = await _calls(rig, "event.offline.list")
        found += await rig.queue.orphans.step(set())
        assert await _calls(rig, "event.offline.list") - before <= PAGES_PER_PASS
        steps += 1
        assert steps <= 5, "the scan does not advance"
    assert sorted(found) == sorted(orphans)
    assert steps == 3  # it went on where the previous step stopped

    # And driven by the drain loop alone (no poll tick, no notification): a fresh bridge finds
    # every orphan, pass after pass, and drains them.
    fresh: Rig = await make_rig()
    await fresh.control.post("/_emulator/events", json={"events": events})
    await _reserve_directly(fresh, rows // 50)
    drainer = Drainer(fresh.queue, metrics=Metrics())
    drainer.start()
    try:
        await collector.wait_for(rows, timeout=60)
    finally:
        await drainer.stop(1)
    assert drainer.passes >= 3
    assert (await fresh.control.get("/_emulator/queue")).json()["reserved"] == {}


class SpyTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 1)[-1].removesuffix(".json")
        self.bodies.append({"method": method, **json.loads(request.content or b"{}")})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_clears_always_name_their_events(make_rig: MakeRig, amqp_ns: AmqpNamespace) -> None:
    from urllib.parse import parse_qsl

    spy = SpyTransport()
    rig: Rig = await make_rig(spy)
    await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    events = [{"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": str(n)}}} for n in range(230)]
    await rig.control.post("/_emulator/events", json={"events": events})
    await rig.queue.run_pass(full_check=True)
    cleared: list[str] = []
    for body in spy.bodies:
        queries = []
        if body["method"] == "event.offline.clear":
            queries.append(body)
        for command in (body.get("cmd") or {}).values():
            path, _, query = command.partition("?")
            if path == "event.offline.clear":
                pairs = parse_qsl(query)
                queries.append({"message_id": [v for k, v in pairs if k.startswith("message_id")]})
                assert not any(k.startswith("auth_connector") for k, _v in pairs)
        for query in queries:
            ids = query.get("message_id")
            assert ids, "a clear without message_id clears the whole process"
            assert all(isinstance(i, str) and len(i) == 32 for i in ids)
            cleared += ids
    assert len(cleared) == 230
    queue = (await rig.control.get("/_emulator/queue")).json()
    assert queue == {"free": 0, "reserved": {}, "errors": 0}


async def test_reserved_events_older_than_30_days_are_warned_about(
    make_rig: MakeRig, amqp_ns: AmqpNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    rig: Rig = await make_rig()
    await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    events = [{"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": str(n)}}} for n in range(3)]
    await rig.control.post("/_emulator/events", json={"events": events})
    await rig.control.post("/_emulator/clock", json={"advance": 31 * 86400})
    await rig.queue.run_pass(full_check=False)
    warnings = [r for r in caplog.records if "older than 30 days" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].__dict__["events"] == 3  # a logging extra
