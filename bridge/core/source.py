"""What a drain source is: something that runs one pass at a time and reports on it.

The Bitrix24 offline queue (notified, reserved and cleared) and the Diadoc feed (polled with a
cursor) are both sources; the drain loop (:mod:`bridge.core.drainer`) decides when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class PassReport:
    """What one pass moved; ``covered_until``: the upstream time up to which it saw everything
    (notifications sent before it cost nothing)."""

    published: int = 0
    cleared: int = 0
    parked: int = 0
    covered_until: float | None = None


class Source(Protocol):
    """What the drain loop needs of a source.

    A source may also have ``progress_at`` (monotonic time of its last sign of progress: an
    answer from upstream, a confirmed publish; liveness uses it) and ``due_at`` (a monotonic
    time when it wants a pass although nobody asked, or None).
    """

    @property
    def name(self) -> str: ...

    async def run_pass(self, *, full_check: bool) -> PassReport: ...

    def request_stop(self) -> None: ...
