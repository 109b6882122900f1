"""The Bitrix24 portals in scaled mode: each replica drains the portals of the shards it holds.

Every replica knows every portal (the ``portals`` table, read again each lease round), so it can
authenticate any notification; it drains only the portals whose shard it holds. A session is
made for one shard epoch: its REST and OAuth requests carry ``X-Bridge-Replica`` and
``X-Bridge-Epoch`` and are checked against the lease first, its publishes go through a
:class:`~bridge.scaling.fencing.FencedPublisher`, and its journal writes through the state's
fenced view, so nothing happens for a shard after this replica's deadline. A notification for a
portal drained elsewhere is forwarded with ``pg_notify``; an install made here is stored, and
its binding left to the owner as a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import httpx

from bridge.amqp.protocol import Publisher
from bridge.bitrix24.bootstrap import bootstrap
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.portals import BIND, REPLAY, SHUTDOWN_BOUND, Portals, PortalSession, Wiring
from bridge.bitrix24.upstream import Exchange
from bridge.core.errors import BridgeError
from bridge.metrics import Metrics
from bridge.scaling.fencing import Fence, FencedPublisher
from bridge.scaling.shards import shard_of
from bridge.settings import Settings
from bridge.state import Portal
from bridge.state.pg import PgState

log = logging.getLogger(__name__)

Forward = Callable[[str, float | None], Awaitable[None]]  # (member_id, ts) to the owner


class ShardedPortals(Portals):
    REQUESTS = (REPLAY, BIND)

    def __init__(
        self,
        settings: Settings,
        *,
        state: PgState,
        publisher: Publisher,
        metrics: Metrics,
        http: httpx.AsyncClient,
        oauth: OAuthClient,
        replica_id: str,
        forward: Forward,
    ) -> None:
        super().__init__(
            settings, state=state, publisher=publisher, metrics=metrics, http=http, oauth=oauth
        )
        self.pg = state
        self.replica_id = replica_id
        self._forward = forward
        self._fences: dict[int, Fence] = {}  # shards held, with the epoch they are held at
        self._epochs: dict[str, Fence] = {}  # member_id -> the fence its session was made with
        self._directory: dict[str, Portal] = {}  # every stored portal, active or not

    def shard(self, member_id: str) -> int:
        return shard_of(member_id, self.settings.shards)

    async def open(self) -> None:
        # Refresh tokens rotate: one replica at a time may spend the bootstrap token.
        async with self.pg.exclusive("bitrix24 bootstrap"):
            await bootstrap(self.settings, self.state, self.oauth)
        await self._load()

    async def _load(self) -> list[Portal]:
        portals = await self.state.portals(include_inactive=True)
        self._directory = {p.member_id: p for p in portals}
        return portals

    # -- shards ----------------------------------------------------------------------------

    async def gain(self, fence: Fence) -> None:
        """Start draining the shard's portals; each first pass recovers (journal, orphans)."""
        self._fences[fence.shard] = fence
        stale = [m for m, f in self._epochs.items() if f.shard == fence.shard]
        await asyncio.gather(*(self._retire(m, 0.1) for m in stale))
        try:
            await self._load()
        except BridgeError as exc:
            log.warning("portals unreadable; next round", extra={"reason": str(exc)})
        self._start_missing(taken_over=True)

    async def lose(self, shard: int, epoch: int, grace: float) -> None:
        """Stop the shard's drainers: each finishes its page within ``grace``, if it may."""
        fence = self._fences.get(shard)
        if fence is not None and fence.epoch == epoch:
            del self._fences[shard]
        gone = [m for m, f in self._epochs.items() if f.shard == shard and f.epoch <= epoch]
        await asyncio.gather(*(self._retire(m, grace) for m in gone))

    async def discover(self) -> None:
        """Portals installed or uninstalled elsewhere since the last look."""
        await self._load()
        for member_id, portal in self._directory.items():
            if not portal.active and member_id in self.sessions:
                await self._retire(member_id)
        self._start_missing()

    def woken(self, member_id: str, ts: float | None) -> None:
        """A wake-up forwarded by another replica."""
        session = self.sessions.get(member_id)
        if session is not None:
            session.drainer.notify(ts)
        elif self._local(member_id):
            self._spawn(self.discover(), "discover")  # installed elsewhere a moment ago

    def tick_all(self) -> None:
        for session in self.sessions.values():
            session.drainer.tick()

    def _start_missing(self, *, taken_over: bool = False) -> None:
        if self.closing:
            return
        for member_id, portal in self._directory.items():
            if portal.active and member_id not in self.sessions and self._local(member_id):
                session = self._session(portal)
                if taken_over:
                    # The previous owner's last request may still run on the portal and stamp
                    # rows nobody journaled: keep looking for orphans until it cannot any more.
                    session.queue.orphans.abandoned()
                if self.running:
                    session.drainer.start()

    # -- the hooks of Portals --------------------------------------------------------------

    def _local(self, member_id: str) -> bool:
        fence = self._fences.get(self.shard(member_id))
        return fence is not None and fence.valid

    def _wiring(self, portal: Portal) -> Wiring:
        fence = self._fences[self.shard(portal.member_id)]
        self._epochs[portal.member_id] = fence
        state = self.pg.fenced(fence)

        async def shared(member_id: str, failed: str, exchange: Exchange) -> tuple[Portal, bool]:
            refreshed = await state.refresh_portal(member_id, failed, exchange)
            return refreshed.portal, refreshed.exchanged

        headers = {"X-Bridge-Replica": self.replica_id, "X-Bridge-Epoch": str(fence.epoch)}
        options = {
            "guard": fence.check,
            "headers": headers,
            "shared_refresh": shared,
            # Held before (epoch > 1): its last owner's requests count in the portal's bucket.
            "bucket_full": fence.epoch > 1,
        }
        return Wiring(state, FencedPublisher(self.publisher, fence), options)

    def _stored(self, member_id: str) -> Portal | None:
        return self._directory.get(member_id)

    def _wake_elsewhere(self, member_id: str, ts: float | None) -> None:
        self._spawn(self._forward(member_id, ts), "forward wake-up")

    async def _installed_elsewhere(self, portal: Portal) -> None:
        self._directory[portal.member_id] = portal
        if self.settings.events or self.settings.public_url:
            await self.state.request(portal.member_id, BIND)
        await self._forward(portal.member_id, None)

    async def _uninstall_elsewhere(self, member_id: str) -> None:
        await self.state.uninstall(member_id)
        portal = self._directory.get(member_id)
        if portal is not None:
            self._directory[member_id] = replace(
                portal, status="uninstalled", access_token="", refresh_token=""
            )
        await self._forward(member_id, None)

    async def _requested_elsewhere(self, member_id: str, kind: str) -> None:
        portal = self._directory.get(member_id)
        if portal is not None and portal.active:
            await self.state.request(member_id, kind)  # for the portal's owner to take

    async def install(self, member_id: str, refresh_token: str, application_token: str) -> Portal:
        portal = await super().install(member_id, refresh_token, application_token)
        self._directory[portal.member_id] = portal
        return portal

    async def uninstall(self, session: PortalSession) -> None:
        await super().uninstall(session)
        self._directory[session.portal.member_id] = session.portal

    async def _retire(self, member_id: str, grace: float = SHUTDOWN_BOUND) -> None:
        self._epochs.pop(member_id, None)
        await super()._retire(member_id, grace)
