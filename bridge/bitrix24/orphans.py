"""Finding reservations whose answer never arrived (orphans), a few pages at a time.

A reservation request that timed out or was cancelled may still have stamped rows under a
``process_id`` nobody knows; such rows are hidden from every later reservation until they are
re-read with that ``process_id``. ``event.offline.list`` shows every reserved row with its
``PROCESS_ID``: the ones not in the journal are orphans.

The scan is paced (it spends ``event.offline.list`` budget only when the pacer has room),
resumable (it continues after the last ``ID`` it saw, so a busy portal's scan spreads over
several passes instead of restarting) and bounded (a few pages per pass), so it never keeps
reservations from making progress. After an abandoned request it keeps looking until a full
sweep has run later than the request could still be executing on the portal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from bridge.bitrix24.upstream import PortalClient

log = logging.getLogger(__name__)

LIST = "event.offline.list"
# Of 50 rows each. A crash mid-batch can orphan a whole batch of reservations (25 pages of 50
# rows); a pass finds up to 1,000 reserved rows and the next pass goes on from there.
PAGES_PER_PASS = 20
RETRY_SPACING = 5.0  # seconds between passes that only owe the scan


class OrphanScan:
    def __init__(
        self,
        client: PortalClient,
        *,
        connector: str,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._connector = connector
        self._grace = grace
        self._clock = clock
        self.suspected = True  # unknown until the first full sweep
        self._until = 0.0  # keep sweeping until a sweep completes after this moment
        self._after_id = 0
        self._sweep_started = clock()
        self._last_step = -RETRY_SPACING

    def abandoned(self) -> None:
        """A reservation request got no answer: it may still run on the portal for a while."""
        self.suspected = True
        self._until = max(self._until, self._clock() + self._grace)

    def suspect(self) -> None:
        """A reservation may have stamped rows without telling us (a fault after running)."""
        self.suspected = True

    @property
    def due_at(self) -> float | None:
        """When a pass should run to go on looking, even without a notification or a poll
        tick (``BRIDGE_POLL_INTERVAL=0``): while a sweep is unfinished, and after an abandoned
        request until a sweep has run late enough. None when nothing is owed."""
        if not self.suspected:
            return None
        return max(self._until, self._last_step + RETRY_SPACING)

    async def step(self, known: set[str]) -> list[str]:
        """Scan up to ``PAGES_PER_PASS`` pages; answers orphaned process ids found."""
        orphans: list[str] = []
        budget = self._client.pacer.budget(LIST)
        self._last_step = self._clock()
        for _ in range(PAGES_PER_PASS):
            if budget.room() < 1:
                return orphans  # paced: the next pass goes on from here
            if self._after_id == 0:
                self._sweep_started = self._clock()
            params: dict[str, object] = {
                "filter": {">PROCESS_ID": "", ">ID": self._after_id},
                "order": {"ID": "ASC"},
            }
            if self._connector:
                params["auth_connector"] = self._connector
            answer = await self._client.call(LIST, params, idempotent=True)
            rows = answer.result if isinstance(answer.result, list) else []
            before = self._after_id
            for row in rows:
                if not isinstance(row, dict):
                    continue
                pid = row.get("PROCESS_ID")
                if isinstance(pid, str) and pid and pid not in known and pid not in orphans:
                    orphans.append(pid)
                try:
                    self._after_id = max(self._after_id, int(row.get("ID", 0)))
                except (TypeError, ValueError):
                    continue
            if not rows or answer.next is None or self._after_id <= before:
                self._finish_sweep()  # the last page (or paging that does not advance)
                break
        return orphans

    def _finish_sweep(self) -> None:
        self._after_id = 0
        if self._sweep_started >= self._until:
            self.suspected = False
            self._until = 0.0
