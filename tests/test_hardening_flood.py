"""Rate limits on our side: a flood of notifications costs no more than the portal's budget.

2,000 notifications (half genuine, with and without ``ts``; half forged) hit a running bridge
whose emulated portal enforces Bitrix24's leaky bucket (2 requests/s, burst 50). The portal must
never answer ``QUERY_LIMIT_EXCEEDED``, requests and drain passes must stay within what the bucket
allows for the elapsed time, and no two passes (nor two reservations) may run at once.

Checked by breaking the code on purpose (then restored): with ``BRIDGE_RATE_LIMIT=500`` and
``BRIDGE_RATE_BURST=500`` for the bridge (no local bucket worth the name) the untimed genuine
notifications drive back-to-back passes and the portal answered ``QUERY_LIMIT_EXCEEDED`` 7 times.
The concurrency probes are proven live by ``passes.calls`` matching the drain-pass metric.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import pytest

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, free_port
from tests.plugins.broker import AmqpNamespace

P = ParamSpec("P")
R = TypeVar("R")

RATE, BURST = 2, 50
FLOOD_SECONDS = 8.0
FORM = {"content-type": "application/x-www-form-urlencoded"}


class InFlight:
    """Counts how many calls of something run at once, and the most ever seen."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.calls = 0

    def wrap(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        async def probe(*args: P.args, **kwargs: P.kwargs) -> R:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
            try:
                return await fn(*args, **kwargs)
            finally:
                self.now -= 1

        return probe


class ReservationProbe(httpx.AsyncBaseTransport):
    """Forwards to the emulator and measures concurrent requests that reserve events."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.reserving = InFlight()
        self.requests = 0

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/rest/"):
            self.requests += 1
        if b"event.offline.get" in request.url.path.encode() + request.content:
            forward: Callable[..., Awaitable[httpx.Response]] = self.reserving.wrap(
                self.inner.handle_async_request
            )
            return await forward(request)
        return await self.inner.handle_async_request(request)


def flood(url: str, bodies: list[str], seconds: float, connections: int = 20) -> list[int]:
    """POST every body within ``seconds``, pipelined over keep-alive connections from threads.

    Spread over seconds rather than all at once: a burst is over before the drainer gets the
    loop back, while a steady flood gives it the chance to start a pass per notification.
    """
    host, port = url.removeprefix("http://").split(":")
    shares = [bodies[i::connections] for i in range(connections)]

    def one(share: list[str]) -> list[int]:
        requests = [
            (
                f"POST /bitrix24/events HTTP/1.1\r\nHost: bridge\r\n"
                f"Content-Type: {FORM['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}"
            ).encode()
            for body in share
        ]
        received = b""
        gap = seconds / len(share)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            for request in requests:
                sock.sendall(request)
                time.sleep(gap)  # pacing the sender, not waiting for an outcome
            while received.count(b"HTTP/1.1 ") < len(share):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return [int(part[:3]) for part in received.split(b"HTTP/1.1 ")[1:]]

    with ThreadPoolExecutor(connections) as pool:
        return [status for statuses in pool.map(one, shares) for status in statuses]


@pytest.fixture
async def throttled() -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    bridge_port = free_port()
    config = EmulatorConfig(
        handler_url=f"http://127.0.0.1:{bridge_port}/bitrix24/events",
        rate_limit=RATE,
        rate_burst=BURST,
        auto_bind=True,
    )
    server = EmulatorServer(config).start()
    portal = Portal(server.base_url)
    yield server, portal, bridge_port
    await portal.close()
    server.stop()


async def test_notification_flood_stays_within_the_portal_budget(
    throttled: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = throttled
    app = await portal.app()
    member, token = app["member_id"], app["application_token"]
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_RATE_LIMIT=str(RATE),
        BRIDGE_RATE_BURST=str(BURST),
        BRIDGE_POLL_INTERVAL="0",
    )
    probe = ReservationProbe()
    passes = InFlight()
    started = time.monotonic()
    async with bridge_in_process(env, transport=probe) as bridge:
        session = bridge.service.sessions[member]
        await session.drainer.idle.wait()
        startup_passes = session.drainer.passes
        # Every pass the drainer starts from now on goes through this probe.
        # On this one instance: mypy refuses any assignment to a method.
        session.queue.run_pass = passes.wrap(session.queue.run_pass)  # type: ignore[method-assign]
        await portal.generate("ONCRMLEADADD", 300)
        now = int(time.time())
        genuine = f"auth[member_id]={member}&auth[application_token]={token}"
        bodies = []
        for n in range(2000):
            if n % 2:
                bodies.append(
                    f"event=ONOFFLINEEVENT&auth[member_id]={member}&auth[application_token]=x"
                )
            elif n % 6 == 0:
                bodies.append(f"event=ONOFFLINEEVENT&{genuine}")  # no ts: always worth a pass
            elif n % 6 == 2:
                bodies.append(f"event=ONOFFLINEEVENT&ts={now}&{genuine}")  # replayed
            else:
                bodies.append(f"event=ONOFFLINEEVENT&ts={now + n}&{genuine}")  # ever newer
        flood_started = time.monotonic()
        statuses = await asyncio.to_thread(flood, bridge.url, bodies, FLOOD_SECONDS)
        flood_took = time.monotonic() - flood_started
        await portal.wait_empty(timeout=60)
        await session.drainer.idle.wait()
        elapsed = time.monotonic() - started
        registry = bridge.service.metrics.registry
        drain_passes = sum(
            registry.get_sample_value(
                "bitrix24_bridge_drain_passes_total",
                {"portal": session.portal.domain, "outcome": outcome},
            )
            or 0.0
            for outcome in ("ok", "failed", "stopped")
        )
    await probe.aclose()
    stats = await portal.stats()
    budget = BURST + RATE * elapsed + 2
    print(
        f"elapsed={elapsed:.1f}s flood={flood_took:.1f}s passes={drain_passes:.0f} "
        f"requests={probe.requests} budget={budget:.0f} most_passes={passes.most} "
        f"most_reservations={probe.reserving.most}"
    )
    assert sorted(set(statuses)) == [200, 401]
    assert statuses.count(200) == 1000
    assert "QUERY_LIMIT_EXCEEDED" not in stats["errors"], stats["errors"]
    assert probe.requests <= budget
    assert drain_passes <= budget
    # The flood had every chance to overlap passes: many more wake-ups than passes ran.
    assert passes.calls == drain_passes - startup_passes >= 2
    assert passes.most == 1, "two drain passes ran at once"
    assert probe.reserving.most == 1, "two reservation requests were in flight at once"
    assert len({json.loads(m.body)["ID"] for m in collector.messages}) == 300
