"""The portal's request-rate limit: a leaky bucket per portal (operating time: ``operating.py``)."""

from __future__ import annotations


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
