"""The portal's two limits: the request-rate leaky bucket and per-method operating time."""

from __future__ import annotations

import math
from collections import defaultdict

WINDOW_BUCKETS = 10
BUCKET_SECONDS = 60.0


class LeakyBucket:
    """+1 per request, drains ``rate`` per second; a request finding it above ``burst`` is refused.

    A refused request still adds 1: the portal counts what arrives, not what it served.
    """

    def __init__(self, rate: float | None, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.level = 0.0
        self._updated: float | None = None

    def hit(self, now: float) -> bool:
        """Count one request; False if it must be refused."""
        if not self.rate:
            return True
        if self._updated is not None:
            self.level = max(0.0, self.level - (now - self._updated) * self.rate)
        self._updated = now
        allowed = self.level <= self.burst
        self.level += 1
        return allowed

    def reset(self) -> None:
        self.level = 0.0
        self._updated = None


class OperatingTime:
    """Seconds of processing per method in ten one-minute buckets (a sliding ten minutes)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._buckets: dict[str, dict[int, float]] = defaultdict(dict)

    def _live(self, method: str, now: float) -> dict[int, float]:
        buckets = self._buckets[method]
        oldest = math.floor(now / BUCKET_SECONDS) - WINDOW_BUCKETS + 1
        for minute in [m for m in buckets if m < oldest]:
            del buckets[minute]
        return buckets

    def used(self, method: str, now: float) -> float:
        return sum(self._live(method, now).values())

    def exceeded(self, method: str, now: float) -> bool:
        return self.used(method, now) > self.budget

    def charge(self, method: str, seconds: float, now: float) -> None:
        minute = math.floor(now / BUCKET_SECONDS)
        buckets = self._live(method, now)
        buckets[minute] = buckets.get(minute, 0.0) + seconds

    def reset_at(self, method: str, now: float) -> int:
        """When the oldest charged minute leaves the window (now, if nothing is charged)."""
        buckets = self._live(method, now)
        if not buckets:
            return int(now)
        return int((min(buckets) + WINDOW_BUCKETS) * BUCKET_SECONDS)

    def reset(self) -> None:
        self._buckets.clear()
