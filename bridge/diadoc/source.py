"""One Diadoc box as a drain source: read a page after the cursor → publish → confirm → advance.

The cursor (where the next read resumes, stored per box) moves only through
:meth:`DocflowFeed._advance`, which accepts only a :class:`ConfirmedPage`, and a
``ConfirmedPage`` exists only when RabbitMQ confirmed every event of the page that needed
publishing. A crash anywhere re-reads the page after the stored cursor: at-least-once.

What is published and what is set aside as malformed is :mod:`bridge.diadoc.delivery`'s
business; events filed late, behind the cursor, the re-scan's (:mod:`bridge.diadoc.rescan`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bridge.amqp.protocol import Publisher
from bridge.core.errors import NotConfirmed
from bridge.core.source import PassReport
from bridge.diadoc.client import DiadocClient
from bridge.diadoc.cursor import MAX_LIMIT, ConfirmedPage, Cursor, Page
from bridge.diadoc.delivery import SOURCE, Delivery
from bridge.diadoc.metrics import DiadocMetrics
from bridge.diadoc.rescan import rescan
from bridge.diadoc.ticks import TICKS_PER_SECOND, timestamp, to_ticks, to_unix
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

# ToTimestamp of every read: far enough ahead that a server clock running fast cannot hide an
# event from a read whose cursor then moves past it.
FUTURE_MARGIN = 86_400.0


@dataclass(frozen=True, slots=True)
class FeedOptions:
    exchange: str = "diadoc.events"
    page_limit: int = 100
    rescan_window: float = 86_400.0
    rescan_interval: float = 1800.0
    start_lookback: float = 3600.0
    seen_keep: int = 100_000
    populate_documents: bool = True
    department_id: str | None = None


class DocflowFeed:
    """The docflow events of one box, drained one pass at a time."""

    def __init__(
        self,
        box_id: str,
        *,
        client: DiadocClient,
        state: StateStore,
        publisher: Publisher,
        metrics: DiadocMetrics,
        options: FeedOptions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.box_id = box_id
        self.client = client
        self._state = state
        self._metrics = metrics
        self.options = options
        self._clock = clock
        self._last_rescan = -math.inf  # a fresh process re-scans first: it may follow a crash
        self.rescans = 0
        self.stopping = False
        self.delivery = Delivery(
            box_id,
            state=state,
            publisher=publisher,
            metrics=metrics,
            exchange=options.exchange,
            seen_keep=options.seen_keep,
        )
        # The lag counts from the last catch-up on record, or from this start.
        self.caught_up_at: float | None = None
        self._started = clock()
        metrics.track_lag(box_id, lambda: self.caught_up_at or self._started, clock)

    def request_stop(self) -> None:
        """Finish the page in flight (publish, confirm, advance), then read nothing more."""
        self.stopping = True

    @property
    def name(self) -> str:
        return f"diadoc:{self.box_id}"

    # -- the pass ----------------------------------------------------------------------

    async def run_pass(self, *, full_check: bool) -> PassReport:
        report = PassReport()
        cursor = await self.cursor()
        widened = False  # the read is a tie that filled a page, read again with the largest page
        while not self.stopping:
            limit = MAX_LIMIT if widened else self.options.page_limit
            page = await self.read(self._from_ticks(cursor), after=cursor.after, limit=limit)
            if page.empty:
                await self._caught_up(cursor)
                break
            more = page.full
            if widened and page.keys and page.keys[-1] != page.keys[0]:
                page, more = page.head(), True  # the whole tie, and only it
            widened = False
            resume = page.resume()
            if resume is None and page.full and limit < MAX_LIMIT:
                widened = True
                continue
            if resume is None and page.full:
                self.delivery.tie_overflow(page)
                resume = page.keys[-1]
            await self.delivery.reject(page.rejects)
            result = await self.delivery.publish(page.events, report, late=False)
            if resume is None:  # nothing but malformed events without a key
                await self._caught_up(cursor)
                break
            confirmed = ConfirmedPage.of(page, result, resume=resume, ticks=cursor.ticks)
            cursor = await self._advance(cursor, confirmed)
            self.delivery.rereads = page.rereads()
            report.cleared += len(page.events) - len(self.delivery.rereads)
            if not more:
                await self._caught_up(cursor)
                break
        if self._rescan_due() and not self.stopping:
            await self._rescan(report, cursor)
        return report

    def _from_ticks(self, cursor: Cursor) -> int:
        if cursor.after is None:
            return cursor.ticks
        # Reaching behind the cursor costs nothing (the IndexKey decides what comes next) and
        # keeps events whose IndexKey sorts after the cursor but whose Timestamp lies before it
        # inside the filter.
        return max(0, cursor.ticks - round(self.options.rescan_window * TICKS_PER_SECOND))

    async def cursor(self) -> Cursor:
        raw = await self._state.cursor(SOURCE, self.box_id)
        if raw is not None:
            cursor = Cursor.loads(raw)
            if self.caught_up_at is None and cursor.checked_at is not None:
                self._note_caught_up(cursor.checked_at)
            return cursor
        # The start point is stored at once, so a crash before the first page does not let it
        # drift forward with the clock.
        ticks = to_ticks(self._clock() - self.options.start_lookback)
        start = Cursor(after=None, ticks=ticks, origin=ticks)
        await self._state.set_cursor(SOURCE, self.box_id, start.dumps())
        log.info("diadoc box starts reading", extra={"box": self.box_id})
        return start

    async def _advance(self, cursor: Cursor, page: ConfirmedPage | None) -> Cursor:
        if page is None:
            raise NotConfirmed("a page was not confirmed in full; the cursor stays before it")
        moved = replace(cursor, after=page.after, ticks=page.ticks)
        await self._state.set_cursor(SOURCE, self.box_id, moved.dumps())
        self._metrics.last_event.labels(box=self.box_id).set(to_unix(moved.ticks))
        return moved

    async def _caught_up(self, cursor: Cursor) -> None:
        now = self._clock()
        await self._state.set_cursor(SOURCE, self.box_id, replace(cursor, checked_at=now).dumps())
        self._note_caught_up(now)

    def _note_caught_up(self, at: float) -> None:
        self.caught_up_at = at
        self._metrics.caught_up.labels(box=self.box_id).set(at)

    # -- reading (the re-scan reads the same way) ---------------------------------------

    def request(
        self,
        from_ticks: int,
        *,
        after: str | None,
        limit: int,
        populate: bool,
        to_ticks: int | None = None,
    ) -> dict[str, Any]:
        # No SortDirection: ascending is the API's default (TimeBasedFilter.proto).
        high = timestamp(self._clock() + FUTURE_MARGIN) if to_ticks is None else {"Ticks": to_ticks}
        request: dict[str, Any] = {
            "Filter": {"FromTimestamp": {"Ticks": from_ticks}, "ToTimestamp": high},
            "Limit": limit,
            "PopulateDocuments": populate,
            "PopulatePreviousDocumentStates": False,
            "InjectEntityContent": False,  # documents can be megabytes; consumers fetch them
        }
        if after is not None:
            request["AfterIndexKey"] = after  # opaque: sent back exactly as received
        if self.options.department_id is not None:
            request["DepartmentId"] = self.options.department_id
        return request

    async def read(
        self, from_ticks: int, *, after: str | None, limit: int, populate: bool | None = None
    ) -> Page:
        return await self.read_request(
            self.request(
                from_ticks,
                after=after,
                limit=limit,
                populate=self.options.populate_documents if populate is None else populate,
            )
        )

    async def read_request(self, request: dict[str, Any]) -> Page:
        answer = await self.client.docflow_events(self.box_id, request)
        self._metrics.last_answer.labels(box=self.box_id).set(self._clock())
        return Page.of(answer.events, limit=int(request["Limit"]))

    # -- re-scan behind the cursor -------------------------------------------------------

    def _rescan_due(self) -> bool:
        if self.options.rescan_window <= 0:
            return False
        return time.monotonic() - self._last_rescan >= self.options.rescan_interval

    async def _rescan(self, report: PassReport, cursor: Cursor) -> None:
        started = time.monotonic()
        low = to_ticks(self._clock() - self.options.rescan_window)
        scanned = await rescan(self, report, from_ticks=max(low, cursor.origin or 0))
        if self.stopping:
            return
        # Only a complete re-scan counts: a failed one runs again on the next pass.
        self._last_rescan = started
        self.rescans += 1
        if scanned > self.options.seen_keep:
            # The seen-set forgets ids the window still holds: each re-scan would publish them
            # again.
            log.warning(
                "diadoc re-scan window holds more events than the seen-set keeps; "
                "raise BRIDGE_DIADOC_SEEN_KEEP",
                extra={"box": self.box_id, "events": scanned, "keep": self.options.seen_keep},
            )
