"""The Bitrix24 source group: one session (REST client, offline queue, drainer) per portal.

Installs, uninstalls and notification authentication happen here; the service only starts,
stops and watches the drainers this group hands it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from aiolimiter import AsyncLimiter

from bridge.amqp.protocol import Publisher
from bridge.bitrix24.binding import bind_portal
from bridge.bitrix24.bootstrap import bootstrap, store_grant
from bridge.bitrix24.messages import Routing
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.offline_queue import OfflineQueue
from bridge.bitrix24.pacing import Pacer
from bridge.bitrix24.upstream import PortalClient
from bridge.core.drainer import Drainer
from bridge.core.errors import BridgeError, TokenError, TransientError
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.state import Portal
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

SHUTDOWN_BOUND = 20.0
HTTP_TIMEOUT = 65.0  # a request may run 60 s on the portal
REPLAY = "replay"  # a request, left in the state file by `parked --replay`, for this process
BIND = "bind"  # a request to bind a portal's events, left by the replica that installed it
INSTALL_RATE, INSTALL_BURST = 1.0, 10  # install attempts per second, and in a burst
_DUMMY_TOKEN = "0" * 32


@dataclass(frozen=True, slots=True)
class Wiring:
    """What a portal's session writes to and publishes with, and how its client is bound."""

    state: StateStore
    publisher: Publisher
    client: dict[str, Any] = field(default_factory=dict)  # PortalClient options


@dataclass(slots=True)
class PortalSession:
    client: PortalClient
    queue: OfflineQueue
    drainer: Drainer

    @property
    def portal(self) -> Portal:
        return self.client.portal


class Portals:
    """Every installed portal of this application."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: StateStore,
        publisher: Publisher,
        metrics: Metrics,
        http: httpx.AsyncClient,
        oauth: OAuthClient,
    ) -> None:
        self.settings = settings
        self.state = state
        self.publisher = publisher
        self.metrics = metrics
        self.http = http
        self.oauth = oauth
        self.sessions: dict[str, PortalSession] = {}
        self.binding_errors: dict[str, str] = {}
        self.closing = False
        self.running = False  # drainers of new installs start at once
        self._install_locks: dict[str, asyncio.Lock] = {}
        self._portal_tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._installs = AsyncLimiter(INSTALL_BURST, INSTALL_BURST / INSTALL_RATE)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the group ------------------------------------------------------------------------

    async def open(self) -> None:
        await bootstrap(self.settings, self.state, self.oauth)
        for portal in await self.state.portals():
            self._session(portal)

    def drainers(self) -> list[Drainer]:
        return [session.drainer for session in self.sessions.values()]

    async def poll(self) -> None:
        await self.poll_once()

    def health(self) -> list[dict[str, object]]:
        return self.portal_health()

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A refresh the OAuth server already answered must reach the state file.
        await asyncio.gather(*(s.client.aclose() for s in self.sessions.values()))

    def _spawn(self, coro: object, name: str, *, member_id: str | None = None) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if member_id is not None:
            # A portal's background work, cancelled when its session is replaced.
            owned = self._portal_tasks.setdefault(member_id, set())
            owned.add(task)
            task.add_done_callback(owned.discard)

    # -- portals -------------------------------------------------------------------------

    def _wiring(self, portal: Portal) -> Wiring:
        return Wiring(self.state, self.publisher)

    def _session(self, portal: Portal) -> PortalSession:
        wiring = self._wiring(portal)
        state = wiring.state
        client = PortalClient(
            portal,
            http=self.http,
            oauth=self.oauth,
            save=state.save_portal,
            load=state.portal,
            metrics=self.metrics,
            rate_limit=self.settings.rate_limit,
            rate_burst=self.settings.rate_burst,
            pacer=Pacer(limit=self.settings.operating_limit),
            **wiring.client,
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
            publisher=wiring.publisher,
            routing=routing,
            metrics=self.metrics,
            page_size=self.settings.page_size,
            poison_attempts=self.settings.poison_attempts,
            abandon_grace=HTTP_TIMEOUT + 10.0,
        )
        drainer = Drainer(queue, metrics=self.metrics, min_gap=1 / self.settings.rate_limit)
        member_id = portal.member_id
        drainer.on_stop = lambda reason: self._record_health(member_id, stop_reason=reason or "")
        session = PortalSession(client=client, queue=queue, drainer=drainer)
        self.sessions[portal.member_id] = session
        self.metrics.add_portal(portal.domain)
        return session

    def _record_health(
        self, member_id: str, *, stop_reason: str | None = None, binding_error: str | None = None
    ) -> None:
        """Write a portal's health to the state file, where ``status`` reads it."""
        if self.closing:
            return
        self._spawn(
            self.state.set_health(member_id, stop_reason=stop_reason, binding_error=binding_error),
            f"health {member_id}",
        )

    def _stored(self, member_id: str) -> Portal | None:
        """The portal a notification is checked against."""
        session = self.sessions.get(member_id)
        return None if session is None else session.portal

    def verify(self, member_id: str, application_token: str) -> Portal | None:
        """Constant-time check of a notification's credentials against the stored portal."""
        portal = self._stored(member_id)
        expected = portal.application_token if portal is not None else _DUMMY_TOKEN
        token_ok = hmac.compare_digest(application_token.encode(), expected.encode())
        member_ok = portal is not None and hmac.compare_digest(
            member_id.encode(), portal.member_id.encode()
        )
        if portal is None or not (token_ok and member_ok) or not portal.active:
            return None
        return portal

    def authenticate(self, member_id: str, application_token: str) -> PortalSession | None:
        """The session of the portal a notification authenticates as (None: refused)."""
        if self.verify(member_id, application_token) is None:
            return None
        return self.sessions.get(member_id)

    def wake(self, member_id: str, application_token: str, ts: float | None) -> bool:
        """An ``ONOFFLINEEVENT``: wake the portal's drainer; False when not authenticated."""
        if self.verify(member_id, application_token) is None:
            return False
        session = self.sessions.get(member_id)
        if session is not None:
            session.drainer.notify(ts)
        else:
            self._wake_elsewhere(member_id, ts)
        return True

    def _wake_elsewhere(self, member_id: str, ts: float | None) -> None:
        """A portal drained by another process (scaled mode only)."""

    async def remove(self, member_id: str, application_token: str) -> bool:
        """An ``ONAPPUNINSTALL``; False when not authenticated."""
        if self.verify(member_id, application_token) is None:
            return False
        session = self.sessions.get(member_id)
        if session is not None:
            await self.uninstall(session)
        else:
            await self._uninstall_elsewhere(member_id)
        return True

    async def _uninstall_elsewhere(self, member_id: str) -> None:
        """A portal drained by another process (scaled mode only)."""

    def _local(self, member_id: str) -> bool:
        """Whether this process drains the portal (always, but in scaled mode)."""
        return True

    async def install(self, member_id: str, refresh_token: str, application_token: str) -> Portal:
        """Register a portal after proving the install genuine with the OAuth server."""
        # Each claimed install costs an OAuth request: unauthenticated, so it is rationed.
        if not self._installs.has_capacity():
            raise TransientError("install_rate", "too many install attempts; try again later")
        await self._installs.acquire()
        grant = await self.oauth.refresh(refresh_token)
        if not hmac.compare_digest(grant.member_id.encode(), member_id.encode()):
            raise TokenError(
                "member_mismatch", "the OAuth answer names another portal", method="oauth"
            )
        allowed = self.settings.allowed_domains
        if allowed and grant.domain not in allowed:
            raise TokenError("domain_not_allowed", "the portal is not in BRIDGE_ALLOWED_DOMAINS")
        # Installs of one portal one at a time: two at once would leave two drainers.
        lock = self._install_locks.setdefault(grant.member_id, asyncio.Lock())
        async with lock:
            await self._retire(grant.member_id)
            portal = await store_grant(self.state, grant, application_token)
            if not self._local(portal.member_id):
                await self._installed_elsewhere(portal)
                log.info(
                    "portal installed; drained by another replica",
                    extra={"portal": portal.domain, "member_id": portal.member_id},
                )
                return portal
            session = self._session(portal)
            await self.state.set_health(portal.member_id, stop_reason="", binding_error="")
            if self.settings.events or self.settings.public_url:
                self._spawn(
                    self._bind(session), f"bind {portal.domain}", member_id=portal.member_id
                )
            if self.running and not self.closing:
                session.drainer.start()
        log.info("portal installed", extra={"portal": portal.domain, "member_id": portal.member_id})
        return portal

    async def _installed_elsewhere(self, portal: Portal) -> None:
        """A portal another process drains was installed here (scaled mode only)."""

    async def _retire(self, member_id: str, grace: float = SHUTDOWN_BOUND) -> None:
        """Stop a portal's session and everything it runs in the background."""
        old = self.sessions.pop(member_id, None)
        tasks = list(self._portal_tasks.pop(member_id, ()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if old is not None:
            await old.drainer.stop(grace)
            await old.client.aclose()

    async def _bind(self, session: PortalSession) -> None:
        member_id, domain = session.portal.member_id, session.portal.domain
        try:
            await bind_portal(session.client, self.settings)
        except BridgeError as exc:
            reason = str(exc)
            self.binding_errors[member_id] = reason
            self.metrics.binding_failed.labels(portal=domain).set(1)
            self._record_health(member_id, binding_error=reason)
            log.error("binding events failed", extra={"portal": domain, "reason": reason})
            return
        self.binding_errors.pop(member_id, None)
        self.metrics.binding_failed.labels(portal=domain).set(0)

    async def uninstall(self, session: PortalSession) -> None:
        member_id = session.portal.member_id
        if self.sessions.get(member_id) is session:
            await self._retire(member_id)
        else:
            await session.drainer.stop(SHUTDOWN_BOUND)
        await self.state.uninstall(member_id)
        session.client.portal = replace(
            session.portal, status="uninstalled", access_token="", refresh_token=""
        )
        log.info(
            "portal uninstalled", extra={"portal": session.portal.domain, "member_id": member_id}
        )

    # -- periodic work -------------------------------------------------------------------

    async def poll_once(self) -> None:
        """One poll tick: requests left in the state file, new tokens, safety drains, depth."""
        await self._take_requests()
        for session in list(self.sessions.values()):
            if session.drainer.stopped is not None:
                await self._look_for_new_token(session)
            session.drainer.tick()
            if session.drainer.stopped is None:
                self._spawn(self._observe(session), f"observe {session.portal.domain}")

    REQUESTS: tuple[str, ...] = (REPLAY,)

    async def _take_requests(self) -> None:
        for kind in self.REQUESTS:
            try:
                wanted = await self.state.take_requests(kind)
            except BridgeError as exc:
                log.warning("requests in the state file unreadable", extra={"reason": str(exc)})
                return
            for member_id in wanted:
                session = self.sessions.get(member_id)
                if session is None:
                    await self._requested_elsewhere(member_id, kind)
                elif kind == BIND:
                    self._spawn(
                        self._bind(session), f"bind {session.portal.domain}", member_id=member_id
                    )
                else:
                    session.queue.replay_requested = True
                    log.info(
                        "replay of parked events requested",
                        extra={"portal": session.portal.domain},
                    )
                    session.drainer.resume()
                    session.drainer.notify(None)

    async def _requested_elsewhere(self, member_id: str, kind: str) -> None:
        """A request for a portal this process does not drain (kept for its owner when scaled)."""

    async def _look_for_new_token(self, session: PortalSession) -> None:
        """A portal stopped for its token comes back when the state file holds a newer one."""
        try:
            stored = await self.state.portal(session.portal.member_id)
        except BridgeError:
            return
        current = session.client.portal
        if stored is None or not stored.refresh_token or not stored.active:
            return
        if stored.refresh_token != current.refresh_token:
            session.client.portal = replace(
                current,
                access_token=stored.access_token,
                refresh_token=stored.refresh_token,
                expires_at=stored.expires_at,
            )
            session.drainer.resume()

    async def _observe(self, session: PortalSession) -> None:
        try:
            await session.queue.observe()
        except BridgeError as exc:
            log.info(
                "queue depth unavailable",
                extra={"portal": session.portal.domain, "reason": str(exc)},
            )
        except Exception:
            log.exception("queue depth check failed", extra={"portal": session.portal.domain})

    def portal_health(self) -> list[dict[str, object]]:
        """Per portal: draining or stopped (and why), binding problems. For /readyz and status."""
        out: list[dict[str, object]] = []
        for session in self.sessions.values():
            entry: dict[str, object] = {
                "portal": session.portal.domain,
                "state": "stopped" if session.drainer.stopped else "draining",
            }
            if session.drainer.stopped:
                entry["reason"] = session.drainer.stopped
            binding = self.binding_errors.get(session.portal.member_id)
            if binding:
                entry["binding_error"] = binding
            out.append(entry)
        return out
