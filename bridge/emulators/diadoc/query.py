"""``GetDocflowEventsRequest`` as the emulator reads it, checked the way Diadoc checks it.

The fields follow ``Docflow/DocflowApi.proto`` of ``diadoc/diadocsdk-csharp``:
``Filter`` (a ``TimeBasedFilter``, ``SortDirection`` defaulting to ascending), ``AfterIndexKey``,
``PopulateDocuments``, ``InjectEntityContent``, ``PopulatePreviousDocumentStates``,
``DepartmentId``, ``Limit`` (1..100, default 100).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.emulators.diadoc.events import StoredEvent, decode_index_key


@dataclass(frozen=True, slots=True)
class Query:
    low: int
    high: int
    descending: bool
    after: tuple[int, int] | None
    limit: int
    populate: bool
    department: str | None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Query:
        filt = body.get("Filter")
        if not isinstance(filt, Mapping):
            raise ValueError("Filter is required")
        low = _ticks(filt.get("FromTimestamp"), 0)
        high = _ticks(filt.get("ToTimestamp"), 2**62)
        direction = filt.get("SortDirection", "Ascending")
        if direction not in ("Ascending", "Descending", 1, 2):
            raise ValueError("SortDirection must be Ascending or Descending")
        limit = body.get("Limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError("Limit must be within 1..100")
        raw_after = body.get("AfterIndexKey")
        after = None
        if raw_after is not None:
            if not isinstance(raw_after, str):
                raise ValueError("AfterIndexKey must be a string")
            after = decode_index_key(raw_after)
        if body.get("InjectEntityContent"):
            raise ValueError("the emulator does not inject entity content")
        department = body.get("DepartmentId")
        if department is not None and (not isinstance(department, str) or not department):
            raise ValueError("DepartmentId must be a non-empty string")
        return cls(
            low=low,
            high=high,
            descending=direction in ("Descending", 2),
            after=after,
            limit=limit,
            populate=bool(body.get("PopulateDocuments", False)),
            department=department,
        )

    def select(self, events: list[StoredEvent]) -> tuple[list[StoredEvent], int]:
        """The page this query answers, and how many events match it in all."""
        matching = [
            e
            for e in events
            if self.low <= e.ticks <= self.high
            and (self.department is None or e.department_id == self.department)
        ]
        if self.descending:
            matching.reverse()
        start = 0
        if self.after is not None:
            after = self.after
            # Strictly after: every event sharing the key (a tie) is skipped with it.
            start = next(
                (
                    i
                    for i, e in enumerate(matching)
                    if (e.position < after if self.descending else e.position > after)
                ),
                len(matching),
            )
        return matching[start : start + self.limit], len(matching)


def _ticks(value: object, default: int) -> int:
    if value is None:
        return default
    ticks = value.get("Ticks") if isinstance(value, Mapping) else None
    if not isinstance(ticks, int) or isinstance(ticks, bool):
        raise ValueError('a Timestamp must be {"Ticks": <integer>}')
    return ticks
