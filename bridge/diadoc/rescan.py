"""The late-event re-scan: events Diadoc files behind the cursor, found by reading the window again.

Diadoc sometimes files an event minutes to an hour after its ``Timestamp``; its ``IndexKey``
then sorts behind the cursor and a reader that only follows ``AfterIndexKey`` never sees it.
Every ``rescan_interval`` the feed reads the last ``rescan_window`` seconds again and publishes
what the seen-set does not know. To make a long window affordable the re-scan asks for bare
events (``PopulateDocuments=false``, no previous states, no content: ``GetDocflowEventsRequest``
in ``proto/Docflow/DocflowApi.proto`` of ``diadoc/diadocsdk-csharp``) at the largest page size,
and fetches the document (for the routing key) only for the few events it did not know: one
request per distinct timestamp, filtered to that instant.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bridge.core.errors import NotConfirmed
from bridge.core.source import PassReport
from bridge.diadoc.cursor import MAX_LIMIT
from bridge.diadoc.messages import DocflowEvent

if TYPE_CHECKING:
    from bridge.diadoc.source import DocflowFeed

log = logging.getLogger(__name__)


async def rescan(feed: DocflowFeed, report: PassReport, *, from_ticks: int) -> int:
    """Publish the window's events the seen-set does not know; answers how many were read."""
    after: str | None = None
    scanned = 0
    late = 0
    while not feed.stopping:
        page = await feed.read(from_ticks, after=after, limit=MAX_LIMIT, populate=False)
        if page.empty:
            break
        scanned += len(page.events)
        await feed.delivery.reject(page.rejects)
        fresh = await feed.delivery.unseen(page.events)
        if fresh:
            if feed.options.populate_documents:
                fresh = await _with_documents(feed, fresh)
            result = await feed.delivery.publish(fresh, report, late=True)
            if not result.complete:
                raise NotConfirmed("re-scan: a page was not confirmed in full")
            late += len(result.confirmed)
        if not page.full:
            break
        resume = page.resume()
        if resume is None:
            feed.delivery.tie_overflow(page)
            resume = page.keys[-1]
        after = resume
    if late:
        log.warning(
            "diadoc late events published by the re-scan",
            extra={"box": feed.box_id, "events": late},
        )
    return scanned


async def _with_documents(feed: DocflowFeed, events: Sequence[DocflowEvent]) -> list[DocflowEvent]:
    """The same events with their documents, read back one timestamp at a time."""
    found: dict[str, DocflowEvent] = {}
    for ticks in dict.fromkeys(e.ticks for e in events):
        # One tick either side: the answer is right whether the API's bounds are inclusive or not.
        request = feed.request(
            ticks - 1, to_ticks=ticks + 1, after=None, limit=MAX_LIMIT, populate=True
        )
        page = await feed.read_request(request)
        found.update((e.key, e) for e in page.events)
    full = []
    for event in events:
        populated = found.get(event.key)
        if populated is None:
            # Published without its document (routing key ``<box>.unknown``) rather than lost.
            log.warning(
                "diadoc late event published without its document: not found again",
                extra={"box": feed.box_id, "event": event.key},
            )
        full.append(populated or event)
    return full
