"""What one box publishes: the events the seen-set does not know, confirmed, then remembered.

The seen-set (the ids of events already in RabbitMQ, bounded, in the state file) keeps an event
that is read again (a tie re-read, a re-scan, a page retried after a failure, an event Diadoc
delivers twice) from being published twice. A malformed event is set aside here: parked once in
the state file (``parked`` table, source ``diadoc``), counted and logged, so the cursor can pass
it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from bridge.amqp.protocol import Publisher, PublishResult
from bridge.core.source import PassReport
from bridge.diadoc.cursor import Page
from bridge.diadoc.messages import DocflowEvent, Reject, to_message
from bridge.diadoc.metrics import DiadocMetrics
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

SOURCE = "diadoc"


class Delivery:
    def __init__(
        self,
        box_id: str,
        *,
        state: StateStore,
        publisher: Publisher,
        metrics: DiadocMetrics,
        exchange: str,
        seen_keep: int,
    ) -> None:
        self.box_id = box_id
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self._exchange = exchange
        self._seen_keep = seen_keep
        # Events the next read returns again on purpose (a cut tie): not counted as duplicates.
        self.rereads: frozenset[str] = frozenset()

    async def reject(self, rejects: Sequence[Reject]) -> None:
        """Park malformed events in the state file, once each; count and log the new ones."""
        if not rejects:
            return
        known = {r.ref for r in await self._state.parked(SOURCE) if r.key == self.box_id}
        for reject in rejects:
            if reject.ref in known:
                continue  # read again (a re-scan, a retried page): recorded and counted before
            known.add(reject.ref)
            await self._state.park(SOURCE, self.box_id, reject.ref, reject.reason, reject.body)
            self._metrics.malformed.labels(box=self.box_id).inc()
            log.error(
                "diadoc event malformed: parked in the state file and passed",
                extra={"box": self.box_id, "reason": reject.reason, "ref": reject.ref},
            )

    def tie_overflow(self, page: Page) -> None:
        self._metrics.tie_overflows.labels(box=self.box_id).inc()
        log.error(
            "diadoc: more events share one IndexKey than a page holds; those beyond it cannot "
            "be read and are skipped",
            extra={"box": self.box_id, "index_key": page.keys[-1], "events": len(page.keys)},
        )

    async def unseen(self, events: Sequence[DocflowEvent]) -> list[DocflowEvent]:
        seen = await self._state.seen_filter(SOURCE, self.box_id, [e.key for e in events])
        return [e for e in events if e.key not in seen]

    async def publish(
        self, events: Sequence[DocflowEvent], report: PassReport, *, late: bool
    ) -> PublishResult:
        """Publish the events not published before; record the confirmed ones as seen."""
        unique = list({e.key: e for e in reversed(events)}.values())[::-1]
        fresh = await self.unseen(unique)
        if not late:
            expected = sum(1 for e in events if e.key in self.rereads)
            skipped = len(events) - len(fresh) - expected
            if skipped > 0:
                self._metrics.duplicates.labels(box=self.box_id).inc(skipped)
        messages = [to_message(e, box_id=self.box_id, exchange=self._exchange) for e in fresh]
        result = await self._publisher.publish(messages)
        if result.confirmed:
            # Recorded even when part of the page failed: those are in RabbitMQ, and the retry
            # of the page should not publish them again.
            await self._state.seen_add(
                SOURCE, self.box_id, [m.key for m in result.confirmed], self._seen_keep
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
        return result
