"""The Diadoc boxes in scaled mode: each replica drains the boxes of the shards it holds.

A box hashes into a shard like a portal (``shard_of(box_id, shards)``). On a shard gained, a
drainer is started for each configured box of that shard, its feed built for that shard epoch:
publishes go through a :class:`~bridge.scaling.fencing.FencedPublisher`, cursor and seen-set
writes through the state's fenced view, so nothing is published or advanced for the box after
this replica's deadline. On a shard lost, those drainers finish their page within the grace
they are given. The account's OpenID Connect session is shared by every replica: its token is
renewed under a database lock (see :mod:`bridge.diadoc.auth`), never twice with one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from bridge.amqp.protocol import Publisher
from bridge.core.drainer import Drainer
from bridge.diadoc.client import DiadocClient
from bridge.diadoc.metrics import DiadocMetrics, diadoc_metrics
from bridge.diadoc.settings import DiadocSettings
from bridge.diadoc.source import DocflowFeed
from bridge.diadoc.wiring import PolledDrainer, box_health, diadoc_client, options_of
from bridge.metrics import Metrics
from bridge.scaling.fencing import Fence, FencedPublisher
from bridge.scaling.shards import shard_of
from bridge.state.pg import PgState

log = logging.getLogger(__name__)

OIDC_LOCK = "diadoc oidc"


class ShardedDiadoc:
    """The source group of the Diadoc boxes when several replicas share the state."""

    def __init__(
        self,
        settings: DiadocSettings,
        *,
        state: PgState,
        publisher: Publisher,
        metrics: Metrics,
        http: httpx.AsyncClient,
        shards: int,
    ) -> None:
        self._settings = settings
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self._http = http
        self._shards = shards
        self._fences: dict[int, Fence] = {}  # shards held, with the epoch they are held at
        self._running: dict[str, tuple[Fence, PolledDrainer]] = {}  # box -> its drainer
        self._client: DiadocClient | None = None
        self._dmetrics: DiadocMetrics | None = None
        self.closing = False

    def shard(self, box_id: str) -> int:
        return shard_of(box_id, self._shards)

    async def open(self) -> None:
        self._dmetrics = dmetrics = diadoc_metrics(self._metrics.registry)
        self._client = diadoc_client(
            self._settings,
            state=self._state,
            metrics=dmetrics,
            http=self._http,
            exclusive=lambda: self._state.exclusive(OIDC_LOCK),
        )

    # -- shards (the Sharded protocol of bridge.scaling.ownership) -------------------------

    async def gain(self, fence: Fence) -> None:
        """Start draining the shard's boxes (each first pass re-scans: it may follow a crash)."""
        self._fences[fence.shard] = fence
        stale = [b for b, (f, _) in self._running.items() if f.shard == fence.shard]
        await asyncio.gather(*(self._retire(b, 0.1) for b in stale))
        self._start_missing()

    async def lose(self, shard: int, epoch: int, grace: float) -> None:
        """Stop the shard's drainers: each finishes its page within ``grace``, if it may."""
        fence = self._fences.get(shard)
        if fence is not None and fence.epoch == epoch:
            del self._fences[shard]
        gone = [b for b, (f, _) in self._running.items() if f.shard == shard and f.epoch <= epoch]
        await asyncio.gather(*(self._retire(b, grace) for b in gone))

    async def discover(self) -> None:
        """The boxes are configured, not stored: only a drainer that ended is started again."""
        for box, (_, drainer) in list(self._running.items()):
            if drainer.released:  # fenced off mid-pass; a newer epoch may be held by now
                await self._retire(box, 0.1)
        self._start_missing()

    def woken(self, member_id: str, ts: float | None) -> None:
        return None  # Diadoc sends no notifications: the boxes poll themselves

    def tick_all(self) -> None:
        for _, drainer in self._running.values():
            drainer.tick()

    def _start_missing(self) -> None:
        if self.closing or self._client is None:
            return
        for box in self._settings.boxes:
            fence = self._fences.get(self.shard(box))
            if box in self._running or fence is None or not fence.valid:
                continue
            drainer = self._drainer(box, fence)
            self._running[box] = (fence, drainer)
            drainer.start()

    def _drainer(self, box: str, fence: Fence) -> PolledDrainer:
        assert self._client is not None
        assert self._dmetrics is not None
        feed = DocflowFeed(
            box,
            client=self._client,
            state=self._state.fenced(fence),
            publisher=FencedPublisher(self._publisher, fence),
            metrics=self._dmetrics,
            options=options_of(self._settings),
        )
        return PolledDrainer(feed, metrics=self._metrics, interval=self._settings.poll_interval)

    async def _retire(self, box: str, grace: float) -> None:
        entry = self._running.pop(box, None)
        if entry is not None:
            await entry[1].stop(grace)
            if self._dmetrics is not None:
                with contextlib.suppress(KeyError):
                    self._dmetrics.lag.remove(box)  # drained elsewhere now

    # -- the source group --------------------------------------------------------------------

    def drainers(self) -> list[Drainer]:
        return [drainer for _, drainer in self._running.values()]

    def boxes(self) -> list[str]:
        """The boxes drained here now."""
        return sorted(self._running)

    async def poll(self) -> None:
        return None  # each box's drainer ticks itself

    def health(self) -> list[dict[str, object]]:
        return box_health((box, d) for box, (_, d) in sorted(self._running.items()))

    async def close(self) -> None:
        self.closing = True
        if self._client is not None:
            await self._client.auth.settle()
