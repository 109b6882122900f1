"""The running bridge: state, broker, HTTP client, and one drainer per portal.

The HTTP layer (``bridge.app``) and the command line (``bridge.cli``) both drive this object;
it owns every long-lived resource and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import httpx

from bridge.binding import bind_portal
from bridge.drain import Drainer
from bridge.errors import BridgeError, ConfigError, TokenError, UpstreamError
from bridge.messages import Routing
from bridge.metrics import Metrics
from bridge.oauth import Grant, OAuthClient
from bridge.offline_queue import OfflineQueue
from bridge.publisher import Publisher
from bridge.settings import Settings
from bridge.state import ACTIVE, Portal, State
from bridge.upstream import PortalClient

log = logging.getLogger(__name__)

SHUTDOWN_BOUND = 20.0
STUCK_AFTER = 300.0
_DUMMY_TOKEN = "0" * 32


@dataclass(slots=True)
class PortalSession:
    client: PortalClient
    queue: OfflineQueue
    drainer: Drainer

    @property
    def portal(self) -> Portal:
        return self.client.portal


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.client_id, client_secret = settings.require_credentials()
        self.metrics = metrics or Metrics()
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(65.0, connect=10.0),
            follow_redirects=False,
            headers={"User-Agent": "bitrix24-bridge"},
        )
        self.oauth = OAuthClient(
            self.http,
            oauth_url=settings.oauth_url,
            client_id=self.client_id,
            client_secret=client_secret,
        )
        self.publisher = Publisher(
            settings.amqp_url.get_secret_value(),
            unrouted_exchange=settings.unrouted_exchange,
            declare=settings.declare,
            confirm_timeout=settings.confirm_timeout,
            on_failure=lambda reason: self.metrics.publish_failures.labels(reason=reason).inc(),
            on_connection_change=lambda up: self.metrics.broker_connected.set(1 if up else 0),
        )
        self.state: State | None = None
        self.sessions: dict[str, PortalSession] = {}
        self.closing = False
        self.opened = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """State, broker and known portals; raises BridgeError with a one-line reason."""
        self.settings.warn_plain_http()
        self.state = await State.open(self.settings.state_path, self.settings.state_keys)
        await self.publisher.start()
        self.metrics.broker_connected.set(1 if self.publisher.connected else 0)
        await self._bootstrap()
        for portal in await self.state.portals():
            self._session(portal)
        self.opened = True

    async def start_draining(self) -> None:
        for session in self.sessions.values():
            session.drainer.start()
        if self.settings.poll_interval > 0:
            self._poller = asyncio.create_task(self._poll(), name="poll")

    async def close(self, grace: float = SHUTDOWN_BOUND) -> None:
        self.closing = True
        if self._poller is not None:
            self._poller.cancel()
        deadline = time.monotonic() + grace
        await asyncio.gather(
            *(s.drainer.stop(max(0.1, deadline - time.monotonic())) for s in self.sessions.values())
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.publisher.close()
        await self.http.aclose()
        if self.state is not None:
            await self.state.close()

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- portals -------------------------------------------------------------------------

    def _session(self, portal: Portal) -> PortalSession:
        assert self.state is not None
        state = self.state
        client = PortalClient(
            portal,
            http=self.http,
            oauth=self.oauth,
            save=state.save_portal,
            metrics=self.metrics,
            rate_limit=self.settings.rate_limit,
            rate_burst=self.settings.rate_burst,
        )
        routing = Routing(
            exchange_template=self.settings.exchange_template,
            routing_key_template=self.settings.routing_key_template,
            member_id=portal.member_id,
            domain=portal.domain,
            connector=self.settings.auth_connector,
        )
        queue = OfflineQueue(
            client,
            state=state,
            publisher=self.publisher,
            routing=routing,
            metrics=self.metrics,
            page_size=self.settings.page_size,
        )
        session = PortalSession(
            client=client, queue=queue, drainer=Drainer(queue, metrics=self.metrics)
        )
        self.sessions[portal.member_id] = session
        self.metrics.portal_stopped.labels(portal=portal.domain).set(0)
        return session

    async def _bootstrap(self) -> None:
        s = self.settings
        if not (s.portal_url and s.refresh_token and s.application_token):
            return
        assert self.state is not None
        host = urlsplit(s.portal_url).netloc
        for portal in await self.state.portals(include_inactive=True):
            if portal.domain == host:
                return  # stored state wins: the bootstrap refresh token is dead after first use
        try:
            grant = await self.oauth.refresh(s.refresh_token.get_secret_value())
        except TokenError as exc:
            raise ConfigError(
                f"BRIDGE_REFRESH_TOKEN was refused by the OAuth server ({exc.code})"
            ) from None
        except UpstreamError as exc:
            raise ConfigError(f"cannot bootstrap from BRIDGE_PORTAL_URL: {exc}") from None
        await self._store(grant, s.application_token.get_secret_value())
        log.info(
            "portal bootstrapped", extra={"portal": grant.domain, "member_id": grant.member_id}
        )

    async def _store(self, grant: Grant, application_token: str) -> Portal:
        assert self.state is not None
        portal = Portal(
            member_id=grant.member_id,
            domain=grant.domain,
            client_endpoint=grant.client_endpoint,
            server_endpoint=grant.server_endpoint,
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            application_token=application_token,
            expires_at=grant.expires_at,
            status=ACTIVE,
        )
        await self.state.save_portal(portal)
        return portal

    def authenticate(self, member_id: str, application_token: str) -> PortalSession | None:
        """Constant-time check of a notification's credentials against the stored portal."""
        session = self.sessions.get(member_id)
        expected = session.portal.application_token if session is not None else _DUMMY_TOKEN
        token_ok = hmac.compare_digest(application_token.encode(), expected.encode())
        member_ok = session is not None and hmac.compare_digest(
            member_id.encode(), session.portal.member_id.encode()
        )
        if session is None or not (token_ok and member_ok) or not session.portal.active:
            return None
        return session

    async def install(self, member_id: str, refresh_token: str, application_token: str) -> Portal:
        """Register a portal after proving the install genuine with the OAuth server."""
        grant = await self.oauth.refresh(refresh_token)
        if not hmac.compare_digest(grant.member_id.encode(), member_id.encode()):
            raise TokenError(
                "member_mismatch", "the OAuth answer names another portal", method="oauth"
            )
        allowed = self.settings.allowed_domains
        if allowed and grant.domain not in allowed:
            raise TokenError("domain_not_allowed", "the portal is not in BRIDGE_ALLOWED_DOMAINS")
        old = self.sessions.pop(grant.member_id, None)
        if old is not None:
            await old.drainer.stop(SHUTDOWN_BOUND)
        portal = await self._store(grant, application_token)
        session = self._session(portal)
        if self.settings.events or self.settings.public_url:
            self._spawn(self._bind(session), f"bind {portal.domain}")
        if not self.closing:
            session.drainer.start()
        log.info("portal installed", extra={"portal": portal.domain, "member_id": portal.member_id})
        return portal

    async def _bind(self, session: PortalSession) -> None:
        try:
            await bind_portal(session.client, self.settings)
        except BridgeError as exc:
            log.error(
                "binding events failed", extra={"portal": session.portal.domain, "reason": str(exc)}
            )

    async def uninstall(self, session: PortalSession) -> None:
        assert self.state is not None
        member_id = session.portal.member_id
        self.sessions.pop(member_id, None)
        await session.drainer.stop(SHUTDOWN_BOUND)
        await self.state.uninstall(member_id)
        session.client.portal = replace(
            session.portal, status="uninstalled", access_token="", refresh_token=""
        )
        log.info(
            "portal uninstalled", extra={"portal": session.portal.domain, "member_id": member_id}
        )

    # -- periodic work -------------------------------------------------------------------

    async def _poll(self) -> None:
        interval = self.settings.poll_interval
        while True:
            await asyncio.sleep(interval)
            for session in list(self.sessions.values()):
                session.drainer.tick()
                if session.drainer.stopped is None:
                    self._spawn(self._observe(session), f"observe {session.portal.domain}")

    async def _observe(self, session: PortalSession) -> None:
        with contextlib.suppress(BridgeError):
            await session.queue.observe()

    # -- health --------------------------------------------------------------------------

    def liveness(self) -> str | None:
        now = time.monotonic()
        for session in self.sessions.values():
            d = session.drainer
            if not d.alive and not self.closing:
                return f"drain loop of {session.portal.domain} is not running"
            if d.in_pass and now - d.beat > STUCK_AFTER:
                return f"drain loop of {session.portal.domain} is stuck"
        return None

    def readiness(self) -> str | None:
        if self.closing:
            return "shutting down"
        if not self.publisher.connected:
            return "broker connection is not open"
        problem = self.publisher.problem
        if problem:
            return problem
        if self.state is not None and self.state.write_failure:
            return self.state.write_failure
        usable = [
            s
            for s in self.sessions.values()
            if s.drainer.stopped is None and s.portal.refresh_token
        ]
        if not usable:
            stopped = [f"{s.portal.domain}: {s.drainer.stopped}" for s in self.sessions.values()]
            if stopped:
                return "no portal with a usable token (" + "; ".join(stopped) + ")"
            return "no portal installed yet"
        return None
