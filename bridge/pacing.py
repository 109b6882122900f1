"""How many reservations one ``batch`` request may carry without using up the portal's budget.

Bitrix24 limits a method's *operating time* (its processing time, summed over a sliding ten
minutes) besides the request rate. A ``batch`` is one request but each sub-call is charged to its
method, so the request-rate limit stops mattering once a request carries many reservations; the
operating time becomes the ceiling. The pacer keeps each method's spending at a safe fraction of
the sustainable rate (``budget / window``) with a leaky bucket, learning a call's cost from the
running totals (``time.operating``) the portal reports after each sub-call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MAX_COMMANDS = 50  # Bitrix24 refuses a batch of more commands


class MethodBudget:
    """A leaky bucket of operating seconds for one method."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = 0.0
        self._at = clock()
        self.cost = 0.02  # seconds per call until the portal tells us better
        self._last_total: float | None = None
        self._last_seen = 0.0

    def _drain(self) -> None:
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._at) * self.rate)
        self._at = now

    def room(self) -> int:
        """How many calls fit now."""
        self._drain()
        return int((self.capacity - self._level) / max(self.cost, 1e-6))

    def wait_time(self) -> float:
        """Seconds until one call fits."""
        self._drain()
        excess = self._level + self.cost - self.capacity
        return max(0.0, excess / self.rate)

    def spend(self, calls: int) -> None:
        self._drain()
        self._level += calls * self.cost

    def learn(self, totals: Iterable[float]) -> None:
        """Running totals reported after consecutive calls of this method, in order."""
        values = list(totals)
        now = self._clock()
        samples: list[float] = []
        previous = self._last_total if now - self._last_seen < 5.0 else None
        for value in values:
            if previous is not None and value > previous:
                samples.append(value - previous)
            previous = value
        if values:
            self._last_total, self._last_seen = values[-1], now
        if samples:
            observed = sum(samples) / len(samples)
            self.cost = 0.7 * self.cost + 0.3 * observed if self._learned else observed
            self._learned = True

    _learned = False


class Pacer:
    def __init__(
        self,
        *,
        budget: float = 480.0,
        window: float = 600.0,
        safety: float = 0.95,
        burst_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = budget / window * safety
        self._capacity = self._rate * burst_seconds
        self._clock = clock
        self._budgets: dict[str, MethodBudget] = {}

    def budget(self, method: str) -> MethodBudget:
        found = self._budgets.get(method)
        if found is None:
            found = MethodBudget(self._rate, self._capacity, self._clock)
            self._budgets[method] = found
        return found

    def plan(self, method: str, wanted_other: int, max_calls: int) -> int:
        """Calls of ``method`` to put in the next batch beside ``wanted_other`` other commands."""
        room = min(self.budget(method).room(), max_calls, MAX_COMMANDS - wanted_other)
        return max(room, 0)

    def observe(self, methods: Mapping[str, str], result_time: Mapping[str, Any]) -> None:
        """Learn costs from a batch answer: ``methods`` maps command keys to method names."""
        per_method: dict[str, list[float]] = {}
        for key, method in methods.items():
            info = result_time.get(key)
            if isinstance(info, dict) and isinstance(info.get("operating"), int | float):
                per_method.setdefault(method, []).append(float(info["operating"]))
        for method, totals in per_method.items():
            self.budget(method).learn(totals)
