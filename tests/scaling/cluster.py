"""Several replicas on one PostgreSQL state, draining emulated portals into one broker.

Each portal is an emulator of its own (one portal per emulator); the portals are stored in the
state directly (their tokens taken from each emulator's own OAuth server), as installs would
leave them. Every replica runs in this process behind a :class:`Recorder`, which notes each
upstream request with the replica and epoch headers it carried.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.amqp.protocol import OutgoingMessage, PublishResult
from bridge.bitrix24.bootstrap import store_grant
from bridge.bitrix24.oauth import OAuthClient
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.scaling.shards import shard_of
from bridge.service import Service
from bridge.state.pg import PgState
from tests.harness import InProcessBridge, Portal, bridge_in_process, free_port
from tests.plugins.broker import AmqpNamespace

EVENT = "ONCRMLEADADD"
SHARDS = 4


@dataclass(frozen=True, slots=True)
class Sent:
    at: float  # monotonic
    host: str  # the portal's (emulator's) host:port
    path: str
    replica: str | None
    epoch: str | None
    query: str = ""


class Recorder(httpx.AsyncBaseTransport):
    """Every upstream request of one replica, with the headers that name the replica."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[Sent] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(
            Sent(
                time.monotonic(),
                request.url.netloc.decode(),
                request.url.path,
                request.headers.get("x-bridge-replica"),
                request.headers.get("x-bridge-epoch"),
                request.url.query.decode(),
            )
        )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Emulated:
    server: EmulatorServer
    control: Portal
    member_id: str
    application_token: str

    @property
    def host(self) -> str:
        return self.server.domain


@dataclass
class Replica:
    name: str
    bridge: InProcessBridge
    recorder: Recorder
    published: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, messages)

    @property
    def service(self) -> Service:
        return self.bridge.service

    def owns(self, member_id: str) -> bool:
        ownership = self.service.ownership
        assert ownership is not None
        return ownership.leases.owns(shard_of(member_id, self.service.settings.shards))


@contextlib.asynccontextmanager
async def emulated_portals(
    count: int, *, latency_ms: float = 0.0, token_ttl: float = 3600.0
) -> AsyncIterator[list[Emulated]]:
    servers = [
        EmulatorServer(
            EmulatorConfig(
                rate_limit=None, auto_bind=True, latency_ms=latency_ms, token_ttl=token_ttl
            )
        ).start()
        for _ in range(count)
    ]
    portals = [Portal(s.base_url) for s in servers]
    try:
        emulated = []
        for server, portal in zip(servers, portals, strict=True):
            app = await portal.app()
            emulated.append(Emulated(server, portal, app["member_id"], app["application_token"]))
        yield emulated
    finally:
        for portal in portals:
            await portal.close()
        for server in servers:
            server.stop()


async def store_portals(pg_url: str, portals: Sequence[Emulated]) -> None:
    """Store each portal as an install would, with tokens from its own OAuth server."""
    state = await PgState.open(pg_url)
    try:
        async with httpx.AsyncClient() as http:
            for emulated in portals:
                app = await emulated.control.app()
                oauth = OAuthClient(
                    http,
                    oauth_url=app["oauth_url"],
                    client_id=app["client_id"],
                    client_secret=app["client_secret"],
                )
                grant = await oauth.refresh(app["refresh_token"])
                await store_grant(state, grant, app["application_token"])
    finally:
        await state.close()


async def replica_env(
    name: str, pg_url: str, amqp: AmqpNamespace, oauth_from: Emulated, **extra: str
) -> dict[str, str]:
    app = await oauth_from.control.app()
    env = {
        "BRIDGE_AMQP_URL": amqp.url,
        "BRIDGE_EXCHANGE_TEMPLATE": amqp.exchange_template,
        "BRIDGE_UNROUTED_EXCHANGE": amqp.unrouted_exchange,
        "BRIDGE_CLIENT_ID": app["client_id"],
        "BRIDGE_CLIENT_SECRET": app["client_secret"],
        "BRIDGE_OAUTH_URL": app["oauth_url"],
        "BRIDGE_STATE_URL": pg_url,
        "BRIDGE_REPLICA_ID": name,
        "BRIDGE_SHARDS": str(SHARDS),
        "BRIDGE_LEASE_TTL": "2",
        "BRIDGE_LEASE_RENEW": "0.5",
        "BRIDGE_POLL_INTERVAL": "0",
        "BRIDGE_RATE_LIMIT": "500",
        "BRIDGE_RATE_BURST": "500",
        "BRIDGE_HTTP_PORT": str(free_port()),
        "BRIDGE_LOG_FORMAT": "text",
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def replica(name: str, env: dict[str, str]) -> AsyncIterator[Replica]:
    recorder = Recorder()
    async with bridge_in_process(env, transport=recorder) as bridge:
        running = Replica(name, bridge, recorder)
        publisher = bridge.service.publisher
        publish_pages = publisher.publish_pages

        async def recorded(pages: Sequence[Sequence[OutgoingMessage]]) -> list[PublishResult]:
            running.published.append((time.monotonic(), sum(len(p) for p in pages)))
            return await publish_pages(pages)

        publisher.publish_pages = recorded  # type: ignore[method-assign]
        yield running


async def notify(bridge_url: str, portal: Emulated, ts: float | None = None) -> int:
    """An ``ONOFFLINEEVENT`` as the portal sends it, to one replica's webhook."""
    form: dict[str, Any] = {
        "event": "ONOFFLINEEVENT",
        "ts": str(int(ts if ts is not None else time.time())),
        "auth[member_id]": portal.member_id,
        "auth[application_token]": portal.application_token,
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{bridge_url}/bitrix24/events", data=form)
    return response.status_code
