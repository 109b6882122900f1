"""The offline event queue: coalescing, reservation under a ``process_id``, error rows.

Rows live in insertion-ordered dicts so the default reservation (``TIMESTAMP_X ASC``, no filter)
costs O(limit) even on a queue of hundreds of thousands of rows.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from bridge.emulators.bitrix24.phpjson import message_id
from bridge.emulators.bitrix24.query import Filter, Order

# A reservation older than this (counted from the event's TIMESTAMP_X) is deleted by the
# portal's cleanup agent (EventOfflineTable::PROCESS_ID_LIFETIME, "30 days", in fact 34 1/6).
PROCESS_ID_LIFETIME = 2_952_000


def new_process_id() -> str:
    return secrets.token_hex(16)


@dataclass(slots=True)
class Row:
    id: int
    seq: int  # write order; ties in TIMESTAMP_X keep it
    timestamp: int  # whole seconds, like the table's DATETIME column
    event_name: str
    data: Any
    user_id: int
    message_id: str
    process_id: str = ""
    error: bool = False

    def as_event(self, zone: timezone) -> dict[str, Any]:
        return {
            "ID": str(self.id),
            "TIMESTAMP_X": datetime.fromtimestamp(self.timestamp, zone).isoformat(),
            "EVENT_NAME": self.event_name,
            "EVENT_DATA": self.data,
            "EVENT_ADDITIONAL": {"user_id": str(self.user_id)},
            "MESSAGE_ID": self.message_id,
        }

    def as_listed(self, zone: timezone) -> dict[str, Any]:
        return {**self.as_event(zone), "PROCESS_ID": self.process_id, "ERROR": str(int(self.error))}


class OfflineQueue:
    """One application's queue for one ``auth_connector``."""

    def __init__(self, ids: Iterator[int], seqs: Iterator[int]) -> None:
        self._ids = ids
        self._seqs = seqs
        self.rows: dict[int, Row] = {}
        self._free: dict[int, Row] = {}  # unreserved, ERROR=0, in write order
        self._errors: dict[int, Row] = {}  # unreserved, ERROR=1, in write order
        self._unreserved: dict[str, Row] = {}  # MESSAGE_ID -> its free or error row
        self.processes: dict[str, dict[int, Row]] = {}
        self._last_written = 0
        self._in_time_order = True  # false once the clock went back: use the slow path

    # -- portal activity ---------------------------------------------------------------------

    def add(self, event_name: str, data: Any, user_id: int, now: float) -> bool:
        """Queue an event; True if it merged into an existing unreserved row."""
        stamp = int(now)
        if stamp < self._last_written:
            self._in_time_order = False
        self._last_written = max(self._last_written, stamp)
        mid = message_id(event_name.upper(), data)
        row = self._unreserved.get(mid)
        if row is not None:
            home = self._errors if row.error else self._free
            del home[row.id]
            row.timestamp, row.data, row.user_id, row.seq = stamp, data, user_id, next(self._seqs)
            home[row.id] = row
            return True
        row = Row(next(self._ids), next(self._seqs), stamp, event_name.upper(), data, user_id, mid)
        self.rows[row.id] = row
        self._free[row.id] = row
        self._unreserved[mid] = row
        return False

    # -- reading -------------------------------------------------------------------------------

    def select(
        self, flt: Filter, order: Order, limit: int, *, error: bool, process_id: str | None
    ) -> list[Row]:
        if process_id is not None:
            pool: Iterable[Row] = [r for r in self.of_process(process_id) if r.error == error]
        else:
            home = self._errors if error else self._free
            descending = order.by_time
            if not flt and descending is not None and self._in_time_order:
                rows = reversed(home.values()) if descending else iter(home.values())
                return list(itertools.islice(rows, limit))
            pool = home.values()
        return order.sort(row for row in pool if flt.matches(row))[:limit]

    def listing(self, flt: Filter, order: Order) -> list[Row]:
        return order.sort(row for row in self.rows.values() if flt.matches(row))

    # -- reservation and removal -----------------------------------------------------------

    def reserve(self, rows: list[Row], process_id: str) -> None:
        if not rows:
            return
        reserved = self.processes.setdefault(process_id, {})
        for row in rows:
            (self._errors if row.error else self._free).pop(row.id, None)
            self._unreserved.pop(row.message_id, None)
            row.process_id = process_id
            reserved[row.id] = row

    def delete(self, rows: Iterable[Row]) -> int:
        count = 0
        for row in rows:
            if self.rows.pop(row.id, None) is None:
                continue
            count += 1
            if row.process_id:
                reserved = self.processes.get(row.process_id, {})
                reserved.pop(row.id, None)
                if not reserved:
                    self.processes.pop(row.process_id, None)
            else:
                (self._errors if row.error else self._free).pop(row.id, None)
                self._unreserved.pop(row.message_id, None)
        return count

    def of_process(self, process_id: str) -> list[Row]:
        """Rows stamped with ``process_id``; the empty one is every unreserved row, as in SQL."""
        if not process_id:
            return [*self._free.values(), *self._errors.values()]
        return list(self.processes.get(process_id, {}).values())

    def mark_error(self, process_id: str, message_ids: set[str]) -> None:
        """``EventOfflineTable::markError``: the process's rows become error rows, unreserved.

        First every other row with those MESSAGE_IDs that is not an error row goes, a newer
        free copy and other processes' reservations alike; so (MESSAGE_ID, PROCESS_ID) stays
        unique when the marked rows lose their process.
        """
        doomed = [
            row
            for row in self.rows.values()
            if row.message_id in message_ids and not row.error and row.process_id != process_id
        ]
        self.delete(doomed)
        for row in [r for r in self.of_process(process_id) if r.message_id in message_ids]:
            twin = self._unreserved.get(row.message_id)
            if row.error or (twin is not None and twin is not row):
                continue  # an error row already (SQL touches only ERROR=0 rows)
            if row.process_id:
                reserved = self.processes[row.process_id]
                del reserved[row.id]
                if not reserved:
                    del self.processes[row.process_id]
            else:
                del self._free[row.id]
            row.process_id, row.error, row.seq = "", True, next(self._seqs)
            self._errors[row.id] = row
            self._unreserved[row.message_id] = row

    def clean(self, now: float) -> int:
        """The cleanup agent: every row whose event is older than the lifetime is deleted.

        ``cleanProcessAgent`` once deleted only reserved rows (``PROCESS_ID<>''``); the module
        now deletes every row older than ``PROCESS_ID_LIFETIME``, free ones included.
        """
        cutoff = now - PROCESS_ID_LIFETIME
        return self.delete([row for row in self.rows.values() if row.timestamp < cutoff])

    # -- counters --------------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def error_count(self) -> int:
        return len(self._errors)

    def reserved_counts(self) -> dict[str, int]:
        return {pid: len(rows) for pid, rows in self.processes.items()}


class OfflineStore:
    """Every connector's queue of one application; IDs come from one table-wide sequence."""

    def __init__(self, utc_offset_minutes: int) -> None:
        self.zone = timezone(timedelta(minutes=utc_offset_minutes))
        self._ids = itertools.count(1)
        self._seqs = itertools.count(1)
        self.queues: dict[str, OfflineQueue] = {}

    def queue(self, connector: str) -> OfflineQueue:
        found = self.queues.get(connector)
        if found is None:
            found = self.queues[connector] = OfflineQueue(self._ids, self._seqs)
        return found

    def clear(self) -> None:
        self.queues.clear()
