"""Where a box's feed is read from: the stored cursor, one answer as a :class:`Page`, and where
the next read resumes.

``AfterIndexKey`` returns the events whose key sorts after it, and several events of one change
may share one key (a *tie*: ``diadoc/diadocsdk-csharp`` issue 1083 shows two events with the
same ``IndexKey`` and timestamp, the second lost by a reader whose page ended on the first). So a
page cut at its limit never resumes after its own last key: it resumes after the last key
*before* its final tie group, and the next read returns that group whole again (the seen-set
keeps its members from being published twice). Only a tie larger than the largest page (100)
cannot be read in full; that is counted and logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.amqp.protocol import PublishResult
from bridge.diadoc.messages import DocflowEvent, MalformedEvent, Reject, index_key_of, parse_event

MAX_LIMIT = 100  # GetDocflowEventsRequest.Limit: 1..100


@dataclass(frozen=True, slots=True)
class Cursor:
    after: str | None  # IndexKey the next read resumes after; None before the first event
    ticks: int  # that event's Timestamp, or where a new box starts reading
    checked_at: float | None = None  # Unix time the feed was last read to its end
    origin: int | None = None  # where the box started reading: the re-scan never reads before

    def dumps(self) -> str:
        data = {"after": self.after, "ticks": self.ticks, "checked_at": self.checked_at}
        if self.origin is not None:
            data["origin"] = self.origin
        return json.dumps(data)

    @classmethod
    def loads(cls, raw: str) -> Cursor:
        data: Any = json.loads(raw)
        after = data.get("after")
        checked = data.get("checked_at")
        origin = data.get("origin")
        return cls(
            after=after if isinstance(after, str) else None,
            ticks=int(data["ticks"]),
            checked_at=float(checked) if isinstance(checked, int | float) else None,
            origin=origin if isinstance(origin, int) else None,
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One answer, split into the events that can be published and the malformed ones."""

    events: tuple[DocflowEvent, ...]
    rejects: tuple[Reject, ...]
    keys: tuple[str, ...]  # the IndexKey of every event that has one, in feed order
    full: bool  # as many events as were asked for: the feed may go on
    raw: tuple[object, ...] = ()

    @classmethod
    def of(cls, raw_events: Sequence[object], *, limit: int) -> Page:
        events: list[DocflowEvent] = []
        rejects: list[Reject] = []
        keys: list[str] = []
        for raw in raw_events:
            key = index_key_of(raw)
            if key is not None:
                keys.append(key)
            try:
                events.append(parse_event(raw))
            except MalformedEvent as exc:
                rejects.append(Reject.of(raw, exc))
        full = len(raw_events) >= limit
        return cls(tuple(events), tuple(rejects), tuple(keys), full, tuple(raw_events))

    @property
    def empty(self) -> bool:
        return not self.events and not self.rejects

    def resume(self) -> str | None:
        """The ``AfterIndexKey`` of the next read; None when one tie fills the whole page."""
        if not self.keys:
            return None
        last = self.keys[-1]
        if not self.full:
            return last
        return next((key for key in reversed(self.keys) if key != last), None)

    def rereads(self) -> frozenset[str]:
        """Events the next read returns again (the final tie group of a cut page)."""
        if not self.full or self.resume() is None:
            return frozenset()
        last = self.keys[-1]
        return frozenset(e.key for e in self.events if e.index_key == last)

    def head(self) -> Page:
        """Only the leading group of events sharing the first key, as a complete page.

        After a tie filled a page and was read again with the largest page, publishing just
        that group keeps a batch (what a crash may publish twice) no larger than the tie.
        """
        first = self.keys[0]
        count = 0
        for raw in self.raw:
            key = index_key_of(raw)
            if key is not None and key != first:
                break
            count += 1
        return Page.of(self.raw[:count], limit=count + 1)

    def ticks_at(self, key: str) -> int | None:
        return next((e.ticks for e in reversed(self.events) if e.index_key == key), None)


@dataclass(frozen=True, slots=True)
class ConfirmedPage:
    """A page every publishable event of which is in RabbitMQ: the cursor may pass it."""

    after: str
    ticks: int

    @classmethod
    def of(
        cls, page: Page, result: PublishResult, *, resume: str, ticks: int
    ) -> ConfirmedPage | None:
        if not result.complete:
            return None
        return cls(after=resume, ticks=page.ticks_at(resume) or ticks)
