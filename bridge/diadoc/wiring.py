"""The Diadoc source group: one self-polling drainer per box, and its status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from bridge.amqp.protocol import Publisher
from bridge.core.drainer import Drainer
from bridge.core.source import Source
from bridge.diadoc.auth import DiadocAuth
from bridge.diadoc.client import DiadocClient
from bridge.diadoc.cursor import Cursor
from bridge.diadoc.delivery import SOURCE
from bridge.diadoc.metrics import DiadocMetrics, diadoc_metrics
from bridge.diadoc.settings import DiadocSettings
from bridge.diadoc.source import DocflowFeed, FeedOptions
from bridge.diadoc.ticks import to_unix
from bridge.metrics import Metrics
from bridge.state.open import StateStore

log = logging.getLogger(__name__)


class PolledDrainer(Drainer):
    """A drainer that ticks itself: Diadoc sends no notifications, polling is the only trigger."""

    def __init__(
        self,
        source: Source,
        *,
        metrics: Metrics,
        interval: float,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
    ) -> None:
        super().__init__(
            source, metrics=metrics, backoff_base=backoff_base, backoff_cap=backoff_cap
        )
        self.interval = interval
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        super().start()
        self._ticker = asyncio.create_task(self._tick(), name=f"poll {self.source.name}")

    async def stop(self, grace: float) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await super().stop(grace)
        if isinstance(self.source, DocflowFeed):
            # A token renewal outlives a cancelled pass; let it store the rotated token first.
            await self.source.client.auth.settle()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()


def options_of(settings: DiadocSettings) -> FeedOptions:
    return FeedOptions(
        exchange=settings.exchange,
        page_limit=settings.page_limit,
        rescan_window=settings.rescan_window,
        rescan_interval=settings.rescan_interval,
        start_lookback=settings.start_lookback,
        seen_keep=settings.seen_keep,
        populate_documents=settings.populate_documents,
        department_id=settings.department_id,
    )


def diadoc_client(
    settings: DiadocSettings,
    *,
    state: StateStore,
    metrics: DiadocMetrics,
    http: httpx.AsyncClient,
    exclusive: Callable[[], AbstractAsyncContextManager[None]] | None = None,
) -> DiadocClient:
    """The account's API client: one OpenID Connect session shared by every box, so a rotated
    refresh token is used by one refresher at a time (across replicas: under ``exclusive``)."""
    for name in settings.plain_http_urls():
        log.warning("%s uses plain http:// on a non-loopback host; tokens travel unencrypted", name)
    # Both are checked by DiadocSettings whenever boxes are configured.
    assert settings.client_id is not None
    assert settings.client_secret is not None
    auth = DiadocAuth(
        http,
        token_url=settings.token_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret.get_secret_value(),
        bootstrap_refresh_token=(
            settings.refresh_token.get_secret_value() if settings.refresh_token else None
        ),
        state=state,
        metrics=metrics,
        timeout=settings.request_timeout,
        exclusive=exclusive,
    )
    return DiadocClient(
        http,
        auth,
        api_url=settings.api_url,
        api_version=settings.api_version,
        metrics=metrics,
        timeout=settings.request_timeout,
    )


def box_health(drainers: Iterable[tuple[str, Drainer]]) -> list[dict[str, object]]:
    """Each box's entry of the ``/readyz`` detail."""
    out: list[dict[str, object]] = []
    for box, drainer in drainers:
        entry: dict[str, object] = {
            "box": box,
            "state": "stopped" if drainer.stopped else "draining",
        }
        if drainer.stopped:
            entry["reason"] = drainer.stopped
        out.append(entry)
    return out


def diadoc_drainers(
    settings: DiadocSettings,
    *,
    state: StateStore,
    publisher: Publisher,
    metrics: Metrics,
    http: httpx.AsyncClient,
) -> list[Drainer]:
    """One drainer per configured box (none when Diadoc is off); the caller starts and stops them.

    The boxes share one OpenID Connect session, so a rotated refresh token is used by one
    refresher at a time.
    """
    if not settings.enabled:
        return []
    dmetrics = diadoc_metrics(metrics.registry)
    client = diadoc_client(settings, state=state, metrics=dmetrics, http=http)
    options = options_of(settings)
    drainers: list[Drainer] = []
    for box in settings.boxes:
        feed = DocflowFeed(
            box, client=client, state=state, publisher=publisher, metrics=dmetrics, options=options
        )
        drainers.append(PolledDrainer(feed, metrics=metrics, interval=settings.poll_interval))
    return drainers


class DiadocFeeds:
    """The source group the service runs: the configured boxes, each polled by its drainer."""

    def __init__(
        self,
        settings: DiadocSettings,
        *,
        state: StateStore,
        publisher: Publisher,
        metrics: Metrics,
        http: httpx.AsyncClient,
    ) -> None:
        self._settings = settings
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self._http = http
        self._drainers: list[Drainer] = []

    async def open(self) -> None:
        self._drainers = diadoc_drainers(
            self._settings,
            state=self._state,
            publisher=self._publisher,
            metrics=self._metrics,
            http=self._http,
        )

    def drainers(self) -> list[Drainer]:
        return list(self._drainers)

    async def poll(self) -> None:
        return None  # each box's drainer ticks itself

    def health(self) -> list[dict[str, object]]:
        return box_health((d.source.name, d) for d in self._drainers)

    async def close(self) -> None:
        return None  # the drainers' stop settles the token renewal


async def diadoc_status(settings: DiadocSettings, state: StateStore) -> list[dict[str, Any]]:
    """Per box: where its cursor stands and how far behind the feed it is (state only)."""
    now = time.time()
    parked = [r.key for r in await state.parked(SOURCE)]
    rows: list[dict[str, Any]] = []
    for box in settings.boxes:
        raw = await state.cursor(SOURCE, box)
        cursor = Cursor.loads(raw) if raw is not None else None
        last_event = to_unix(cursor.ticks) if cursor and cursor.after else None
        checked = cursor.checked_at if cursor else None
        rows.append(
            {
                "box_id": box,
                "source": "diadoc",
                "started": cursor is not None,
                "cursor": cursor.after if cursor else None,
                "last_event_at": last_event,
                "last_caught_up_at": checked,
                # Seconds since the feed was last read to its end with everything confirmed;
                # None until that happened once.
                "lag_s": None if checked is None else round(max(0.0, now - checked), 1),
                "api_version": settings.api_version,
                # Events set aside as malformed (``parked`` in the state file).
                "malformed": parked.count(box),
            }
        )
    return rows
