"""The running bridge: state, broker, HTTP client, and the source groups with their drainers.

The HTTP layer (``bridge.app``) and the command line (``bridge.cli``) both drive this object;
it owns every long-lived resource and closes them in reverse order. It knows the source groups
only through :class:`~bridge.core.group.SourceGroup`; the Bitrix24 group is also kept by name
(``bitrix24``) because the webhook talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import httpx

from bridge.amqp.publisher import AmqpPublisher
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.portals import HTTP_TIMEOUT, SHUTDOWN_BOUND, Portals, PortalSession
from bridge.core.drainer import Drainer
from bridge.core.group import SourceGroup
from bridge.diadoc.settings import DiadocSettings
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.state.lock import StateLock
from bridge.state.open import StateStore, open_state

if TYPE_CHECKING:
    from bridge.scaling.ownership import Ownership
    from bridge.state.pg import PgState

__all__ = ["SHUTDOWN_BOUND", "STUCK_AFTER", "PortalSession", "Service"]

log = logging.getLogger(__name__)

STUCK_AFTER = 300.0


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
        diadoc: DiadocSettings | None = None,
    ) -> None:
        self.settings = settings
        self.diadoc = diadoc
        self.client_id, client_secret = settings.require_credentials()
        self.metrics = metrics or Metrics()
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(HTTP_TIMEOUT, connect=10.0),
            follow_redirects=False,
            headers={"User-Agent": "bitrix24-bridge"},
        )
        self.oauth = OAuthClient(
            self.http,
            oauth_url=settings.oauth_url,
            client_id=self.client_id,
            client_secret=client_secret,
        )
        self.publisher = AmqpPublisher(
            settings.amqp_url.get_secret_value(),
            unrouted_exchange=settings.unrouted_exchange,
            declare=settings.declare,
            confirm_timeout=settings.confirm_timeout,
            on_failure=lambda reason: self.metrics.publish_failures.labels(reason=reason).inc(),
            on_connection_change=lambda up: self.metrics.broker_connected.set(1 if up else 0),
        )
        self.state: StateStore | None = None
        self.ownership: Ownership | None = None  # scaled mode (BRIDGE_STATE_URL)
        self.lock = StateLock(settings.state_path)
        self._bitrix24: Portals | None = None
        self.groups: list[SourceGroup] = []
        self.closing = False
        self.opened = False
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self, purpose: str = "serve") -> None:
        """State, broker and known portals; raises BridgeError with a one-line reason."""
        self.settings.warn_plain_http()
        scaled = self.settings.state_url is not None
        if not scaled and self.settings.state_path != ":memory:":
            # One process drains a state file and refreshes its tokens (they rotate).
            self.lock.acquire(purpose)
        self.state = await open_state(self.settings)
        await self.publisher.start()
        self.metrics.broker_connected.set(1 if self.publisher.connected else 0)
        if scaled:
            from bridge.state.pg import PgState

            assert isinstance(self.state, PgState)
            self._bitrix24 = self._scaled(self.state)
        else:
            self._bitrix24 = Portals(
                self.settings,
                state=self.state,
                publisher=self.publisher,
                metrics=self.metrics,
                http=self.http,
                oauth=self.oauth,
            )
        self.groups = [self._bitrix24]
        if self.diadoc is not None and self.diadoc.enabled:
            self.groups.append(self._diadoc(self.diadoc))
        for group in self.groups:
            await group.open()
        self.opened = True

    def _scaled(self, state: PgState) -> Portals:
        """Scaled mode: the portals drained where their shard's lease is held."""
        from bridge.bitrix24.sharded import ShardedPortals
        from bridge.scaling.ownership import Ownership

        self.ownership = Ownership(self.settings, state, self.metrics)
        portals = ShardedPortals(
            self.settings,
            state=state,
            publisher=self.publisher,
            metrics=self.metrics,
            http=self.http,
            oauth=self.oauth,
            replica_id=self.ownership.replica_id,
            forward=self.ownership.forward,
        )
        self.ownership.groups = [portals]
        return portals

    def _diadoc(self, settings: DiadocSettings) -> SourceGroup:
        """The Diadoc boxes: all of them here, or (scaled mode) those of the shards held."""
        assert self.state is not None
        if self.ownership is None:
            from bridge.diadoc.wiring import DiadocFeeds

            return DiadocFeeds(
                settings,
                state=self.state,
                publisher=self.publisher,
                metrics=self.metrics,
                http=self.http,
            )
        from bridge.diadoc.sharded import ShardedDiadoc
        from bridge.state.pg import PgState

        assert isinstance(self.state, PgState)
        boxes = ShardedDiadoc(
            settings,
            state=self.state,
            publisher=self.publisher,
            metrics=self.metrics,
            http=self.http,
            shards=self.settings.shards,
        )
        self.ownership.groups.append(boxes)
        return boxes

    @property
    def bitrix24(self) -> Portals:
        """The Bitrix24 portals (the webhook's counterpart)."""
        if self._bitrix24 is None:
            raise RuntimeError("the service is not open")
        return self._bitrix24

    @property
    def sessions(self) -> dict[str, PortalSession]:
        return self.bitrix24.sessions if self._bitrix24 is not None else {}

    def drainers(self) -> list[Drainer]:
        return [drainer for group in self.groups for drainer in group.drainers()]

    async def start_draining(self) -> None:
        if self._bitrix24 is not None:
            self._bitrix24.running = True
        for drainer in self.drainers():
            drainer.start()
        if self.ownership is not None:
            await self.ownership.start()  # drainers start as their shards are gained
        if self.settings.poll_interval > 0:
            self._poller = asyncio.create_task(self._poll(), name="poll")

    async def _poll(self) -> None:
        interval = self.settings.poll_interval
        while True:
            await asyncio.sleep(interval)
            await self.poll_once()

    async def poll_once(self) -> None:
        """One poll tick of every group."""
        for group in self.groups:
            await group.poll()

    async def close(self, grace: float = SHUTDOWN_BOUND) -> None:
        self.closing = True
        if self._poller is not None:
            self._poller.cancel()
        deadline = time.monotonic() + grace
        if self.ownership is not None:
            # Each shard handed over after its page in flight; the drainers are stopped then.
            with contextlib.suppress(Exception):
                await self.ownership.stop()
        if self._bitrix24 is not None:
            self._bitrix24.closing = True  # no install starts a drainer any more
        drainers = self.drainers()
        await asyncio.gather(*(d.stop(max(0.1, deadline - time.monotonic())) for d in drainers))
        for group in self.groups:
            await group.close()
        with contextlib.suppress(Exception):
            await self.publisher.close()
        await self.http.aclose()
        if self.state is not None:
            await self.state.close()
        self.lock.release()

    # -- health --------------------------------------------------------------------------

    def liveness(self) -> str | None:
        now = time.monotonic()
        for d in self.drainers():
            if not d.alive and not self.closing and not d.released:
                return f"drain loop of {d.source.name} is not running"
            # A long pass that keeps moving pages is alive: only a pass without any progress
            # (no answer, no confirm, no planned wait) for STUCK_AFTER seconds is stuck.
            if d.in_pass and now - d.progress_at > STUCK_AFTER:
                return f"drain loop of {d.source.name} made no progress for {int(STUCK_AFTER)} s"
        return None

    def portal_health(self) -> list[dict[str, object]]:
        """Every group's health: one entry per portal or box (the ``/readyz`` detail)."""
        return [entry for group in self.groups for entry in group.health()]

    def readiness(self) -> str | None:
        """Why this process cannot take notifications and publish now; None when it can.

        Only the broker connection (open, and heard from: the AMQP heartbeat closes a silent
        one) and the state file count. Portals do not: none installed yet, or one stopped by a
        configuration error, is reported by ``portal_health()`` (the ``/readyz`` body), ``/metrics``
        and ``status``.
        """
        if self.closing:
            return "shutting down"
        if not self.publisher.connected:
            return self.publisher.problem or "broker connection is not open"
        problem = self.publisher.problem
        if problem:
            return problem
        if self.state is not None and self.state.write_failure:
            return self.state.write_failure
        if self.ownership is not None and (problem := self.ownership.problem()):
            return problem
        # A stopped portal is reported (/readyz detail, metrics, status), never a reason to be
        # unready: this process can still take notifications and publish for the others.
        return None
