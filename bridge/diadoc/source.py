"""One Diadoc box as a drain source: read a page after the cursor → publish → confirm → advance.

The cursor (the ``IndexKey`` of the last event, stored per box) moves only through
:meth:`DocflowFeed._advance`, which accepts only a :class:`ConfirmedPage`, and a
``ConfirmedPage`` exists only when RabbitMQ confirmed every event of the page that needed
publishing. A crash anywhere re-reads the page after the stored cursor: at-least-once.

A cursor alone misses events Diadoc files late, behind it. So every ``rescan_interval`` the pass
also reads the last ``rescan_window`` seconds in full and publishes what the seen-set (the ids of
events already published, bounded, in the state file) does not know yet. The same seen-set keeps
an event delivered twice from being published twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bridge.diadoc.client import DiadocClient
from bridge.diadoc.messages import DocflowEvent, MalformedEvent, parse_event, to_message
from bridge.diadoc.metrics import DiadocMetrics
from bridge.diadoc.ticks import TICKS_PER_SECOND, timestamp, to_ticks, to_unix
from bridge.offline_queue import NotConfirmed, PassReport
from bridge.publisher import Publisher, PublishResult
from bridge.state import State

log = logging.getLogger(__name__)

SOURCE = "diadoc"
# ToTimestamp of every read: far enough ahead that a server clock running fast cannot hide an
# event from a read whose cursor then moves past it.
FUTURE_MARGIN = 86_400.0


@dataclass(frozen=True, slots=True)
class Cursor:
    after: str | None  # IndexKey of the last confirmed event; None before the first one
    ticks: int  # that event's Timestamp, or where a new box starts reading
    checked_at: float | None = None  # Unix time the feed was last read to its end

    def dumps(self) -> str:
        return json.dumps({"after": self.after, "ticks": self.ticks, "checked_at": self.checked_at})

    @classmethod
    def loads(cls, raw: str) -> Cursor:
        data: Any = json.loads(raw)
        after = data.get("after")
        checked = data.get("checked_at")
        return cls(
            after=after if isinstance(after, str) else None,
            ticks=int(data["ticks"]),
            checked_at=float(checked) if isinstance(checked, int | float) else None,
        )


@dataclass(frozen=True, slots=True)
class ConfirmedPage:
    """A page every event of which is in RabbitMQ (or was already): the cursor may pass it."""

    last: DocflowEvent

    @classmethod
    def of(cls, events: Sequence[DocflowEvent], result: PublishResult) -> ConfirmedPage | None:
        if not events or not result.complete:
            return None
        return cls(last=events[-1])


@dataclass(frozen=True, slots=True)
class FeedOptions:
    exchange: str = "diadoc.events"
    page_limit: int = 100
    rescan_window: float = 3600.0
    rescan_interval: float = 300.0
    start_lookback: float = 3600.0
    seen_keep: int = 100_000
    populate_documents: bool = True


class DocflowFeed:
    """The docflow events of one box, drained one pass at a time."""

    def __init__(
        self,
        box_id: str,
        *,
        client: DiadocClient,
        state: State,
        publisher: Publisher,
        metrics: DiadocMetrics,
        options: FeedOptions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.box_id = box_id
        self.client = client
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self.options = options
        self._clock = clock
        self._last_rescan = -math.inf  # a fresh process re-scans first: it may follow a crash
        self.rescans = 0
        self.stopping = False

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
        while not self.stopping:
            events = await self._read(self._from_ticks(cursor), cursor.after)
            if not events:
                cursor = replace(cursor, checked_at=self._clock())
                await self._state.set_cursor(SOURCE, self.box_id, cursor.dumps())
                self._metrics.lag.labels(box=self.box_id).set(0)
                break
            page = await self._publish(events, report, late=False)
            cursor = await self._advance(cursor, page)
            report.cleared += len(events)
        if self._rescan_due() and not self.stopping:
            await self._rescan(report)
        return report

    def _from_ticks(self, cursor: Cursor) -> int:
        if cursor.after is None:
            return cursor.ticks
        # Reaching a little behind the cursor costs nothing (the IndexKey decides what comes
        # next) and keeps events whose IndexKey sorts after the cursor but whose Timestamp
        # lies before it inside the filter.
        return max(0, cursor.ticks - round(self.options.rescan_window * TICKS_PER_SECOND))

    async def cursor(self) -> Cursor:
        raw = await self._state.cursor(SOURCE, self.box_id)
        if raw is not None:
            return Cursor.loads(raw)
        # The start point is stored at once, so a crash before the first page does not let it
        # drift forward with the clock.
        start = Cursor(after=None, ticks=to_ticks(self._clock() - self.options.start_lookback))
        await self._state.set_cursor(SOURCE, self.box_id, start.dumps())
        log.info("diadoc box starts reading", extra={"box": self.box_id})
        return start

    async def _advance(self, cursor: Cursor, page: ConfirmedPage | None) -> Cursor:
        if page is None:
            raise NotConfirmed("a page was not confirmed in full; the cursor stays before it")
        moved = Cursor(
            after=page.last.index_key, ticks=page.last.ticks, checked_at=cursor.checked_at
        )
        await self._state.set_cursor(SOURCE, self.box_id, moved.dumps())
        self._metrics.lag.labels(box=self.box_id).set(
            max(0.0, self._clock() - to_unix(moved.ticks))
        )
        return moved

    # -- steps -------------------------------------------------------------------------

    def _request(self, from_ticks: int, after: str | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "Filter": {
                "FromTimestamp": {"Ticks": from_ticks},
                "ToTimestamp": timestamp(self._clock() + FUTURE_MARGIN),
                "SortDirection": "Ascending",
            },
            "Limit": self.options.page_limit,
            "PopulateDocuments": self.options.populate_documents,
            "PopulatePreviousDocumentStates": False,
            "InjectEntityContent": False,  # documents can be megabytes; consumers fetch them
        }
        if after is not None:
            request["AfterIndexKey"] = after  # opaque: sent back exactly as received
        return request

    async def _read(self, from_ticks: int, after: str | None) -> list[DocflowEvent]:
        page = await self.client.docflow_events(self.box_id, self._request(from_ticks, after))
        try:
            return [parse_event(raw) for raw in page.events]
        except MalformedEvent as exc:
            log.error(
                "diadoc page not published: malformed event",
                extra={"box": self.box_id, "reason": str(exc)},
            )
            raise

    async def _publish(
        self, events: Sequence[DocflowEvent], report: PassReport, *, late: bool
    ) -> ConfirmedPage | None:
        """Publish the events not published before; record the confirmed ones as seen."""
        unique = list({e.key: e for e in reversed(events)}.values())[::-1]
        seen = await self._state.seen_filter(SOURCE, self.box_id, [e.key for e in unique])
        fresh = [e for e in unique if e.key not in seen]
        if len(fresh) < len(events) and not late:
            self._metrics.duplicates.labels(box=self.box_id).inc(len(events) - len(fresh))
        messages = [
            to_message(e, box_id=self.box_id, exchange=self.options.exchange) for e in fresh
        ]
        result = await self._publisher.publish(messages)
        if result.confirmed:
            # Recorded even when part of the page failed: those are in RabbitMQ, and the retry
            # of the page should not publish them again.
            await self._state.seen_add(
                SOURCE, self.box_id, [m.key for m in result.confirmed], self.options.seen_keep
            )
        report.published += len(result.confirmed)
        self._metrics.events_published.labels(box=self.box_id).inc(len(result.confirmed))
        if late and result.confirmed:
            self._metrics.late_events.labels(box=self.box_id).inc(len(result.confirmed))
        if fresh:
            log.info(
                "diadoc page published",
                extra={
                    "box": self.box_id,
                    "events": len(events),
                    "published": len(fresh),
                    "confirmed": len(result.confirmed),
                    "failed": len(result.failed),
                    "rescan": late,
                },
            )
        return ConfirmedPage.of(events, result)

    # -- re-scan behind the cursor -------------------------------------------------------

    def _rescan_due(self) -> bool:
        if self.options.rescan_window <= 0:
            return False
        return time.monotonic() - self._last_rescan >= self.options.rescan_interval

    async def _rescan(self, report: PassReport) -> None:
        started = time.monotonic()
        from_ticks = to_ticks(self._clock() - self.options.rescan_window)
        after: str | None = None
        late = 0
        scanned = 0
        while not self.stopping:
            events = await self._read(from_ticks, after)
            if not events:
                break
            scanned += len(events)
            before = report.published
            if await self._publish(events, report, late=True) is None:
                raise NotConfirmed("re-scan: a page was not confirmed in full")
            late += report.published - before
            after = events[-1].index_key
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
        if late:
            log.warning(
                "diadoc late events published by the re-scan",
                extra={"box": self.box_id, "events": late},
            )
