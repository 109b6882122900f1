"""How much of a portal's operating-time budget the next request may spend.

Bitrix24 limits a method's *operating time* besides the request rate (LoadLimiter v2): the
processing time of each method is summed over a sliding ten minutes; above the limit
(``BRIDGE_OPERATING_LIMIT``, 420 s by default) the method is banned for a fixed 300 s. Each
sub-call of a ``batch`` counts toward its own method and the batch itself toward ``batch`` at
half its duration. Once a request carries many reservations, this budget, not the request rate,
is the ceiling.

Per method, the pacer keeps two guards:

- a leaky bucket draining at the sustainable rate (limit / window, with a safety margin), which
  spreads the spending evenly;
- the portal's own running total, read from ``time.operating`` of every successful answer, plus
  what was sent since, which must stay under the limit less a small margin. So a bridge
  restarted mid-backlog respects what its predecessor spent: until the first answer tells the
  total, one call at a time. The total is never assumed to shrink; when it blocks, one call
  is let through every ``probe_interval`` (or at ``operating_reset_at``) to read it again.

A call that is refused anyway (``OPERATION_TIME_LIMIT``, which carries no ``time`` block) bans
the method locally; it is probed at most once a minute until the portal serves it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MAX_COMMANDS = 50  # commands a batch runs; more are refused one by one
WINDOW = 600.0
BAN_PROBE_INTERVAL = 60.0  # at most one call a minute to a banned method
MIN_COST = 0.001  # a call is never assumed free
CEILING_MARGIN = 0.02  # of the limit, kept free of the portal's running total


class MethodBudget:
    """The operating-time budget of one method."""

    def __init__(
        self,
        *,
        limit: float,
        safety: float,
        burst_seconds: float,
        probe_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.limit = limit
        self.rate = limit / WINDOW * safety
        self.capacity = self.rate * burst_seconds
        # The portal's total may come this close to the limit: a margin for what one request
        # may cost beyond its estimate. (The sustainable rate keeps a long run far below it.)
        self.ceiling = limit - max(2.0, CEILING_MARGIN * limit)
        self.probe_interval = probe_interval
        self._clock = clock
        self._level = 0.0
        self._at = clock()
        self.cost = 0.02  # seconds per call until the portal tells us better
        self._learned = False
        self._history: deque[tuple[float, float, int]] = deque(maxlen=12)
        self.reported: float | None = None  # the portal's running total, last we heard
        self._reported_at = -1e18
        self._sent_since = 0.0  # our spending the report does not cover yet
        self._last_probe = -1e18
        self.reset_at: float | None = None  # when the portal said part of the total goes
        self.banned_until = 0.0
        self.bans = 0

    # -- planning --------------------------------------------------------------------------

    def _drain(self) -> None:
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._at) * self.rate)
        self._at = now

    @property
    def estimated_total(self) -> float:
        return (self.reported or 0.0) + self._sent_since

    def room(self) -> int:
        """How many calls fit now."""
        now = self._clock()
        if now < self.banned_until:
            return 0
        if self.banned_until:
            return 1  # a probe of a ban that should be over: one call, then listen
        self._drain()
        cost = max(self.cost, MIN_COST)
        by_rate = int((self.capacity - self._level) / cost)
        if self.reported is None:
            return min(by_rate, 1)  # the portal's total is unknown: one call to learn it
        by_total = int((self.ceiling - self.estimated_total) / cost)
        if by_total < 1 and by_rate >= 1 and self._may_probe(now, cost):
            return 1
        return max(0, min(by_rate, by_total))

    def _probe_at(self) -> float:
        """When the next probe may go: after ``probe_interval``, or at ``operating_reset_at``
        (from the last successful answer) if that comes first."""
        at = max(self._reported_at, self._last_probe) + self.probe_interval
        if self.reset_at is not None and self.reset_at > self._last_probe:
            at = min(at, self.reset_at)
        return at

    def _may_probe(self, now: float, cost: float) -> bool:
        # The total may have shrunk since we last heard it; one call costs little next to the
        # margin between the ceiling and the limit, and its answer tells the new total.
        return now >= self._probe_at() and self.estimated_total + cost < self.limit

    def wait_time(self) -> float:
        """Seconds until one call may fit (a lower bound: ask ``room`` again then)."""
        now = self._clock()
        if now < self.banned_until:
            return self.banned_until - now
        self._drain()
        cost = max(self.cost, MIN_COST)
        by_rate = max(0.0, (self._level + cost - self.capacity) / self.rate)
        if self.reported is not None and self.estimated_total + cost > self.ceiling:
            return max(by_rate, self._probe_at() - now, 0.05)
        return by_rate

    def spend(self, calls: int) -> None:
        if calls <= 0:
            return
        self._drain()
        amount = calls * max(self.cost, MIN_COST)
        self._level += amount
        self._sent_since += amount
        now = self._clock()
        if self.reported is not None and self.estimated_total > self.ceiling:
            self._last_probe = now
        if self.banned_until and now >= self.banned_until:
            self._last_probe = now
            self.banned_until = now + BAN_PROBE_INTERVAL  # until an answer lifts it

    # -- listening -------------------------------------------------------------------------

    def report(self, totals: Iterable[float], calls: int, reset_in: float | None = None) -> None:
        """Running totals from one successful answer (in call order) for ``calls`` calls;
        ``reset_in``: seconds until ``operating_reset_at`` by the portal's own clock."""
        values = [t for t in totals if t >= 0]
        if not values:
            return
        now = self._clock()
        if reset_in is not None:
            self.reset_at = now + max(0.0, reset_in)
        total = values[-1]
        self._learn_from(now, total, calls)
        self.reported = total
        self._reported_at = now
        # What this request spent may or may not be in its own answer (the portal adds a
        # request's time when it ends): keep counting it once more, to be safe.
        self._sent_since = calls * max(self.cost, MIN_COST)
        self.banned_until = 0.0

    def _learn_from(self, now: float, total: float, calls: int) -> None:
        """A call's cost from the growth of the total over the last few answers.

        Whether an answer's total includes its own request depends on the portal (LoadLimiter
        v2 adds a request's time when it ends), so the growth is divided by the mean of the
        two possible call counts; over several requests the difference is small.
        """
        history = self._history
        if history and (total < history[-1][1] or now - history[-1][0] > 60.0):
            history.clear()  # part of the window expired, or too long ago: start again
        history.append((now, total, calls))
        if len(history) < 3:
            return
        grown = total - history[0][1]
        counted = [c for _t, _total, c in history]
        calls_between = (sum(counted[1:]) + sum(counted[:-1])) / 2
        if grown > 0 and calls_between > 0:
            observed = grown / calls_between
            self.cost = 0.5 * self.cost + 0.5 * observed if self._learned else observed
            self._learned = True

    def ban(self) -> float:
        """The portal refused the method: wait, then probe once a minute. Answers the wait."""
        self.bans += 1
        self.banned_until = self._clock() + BAN_PROBE_INTERVAL
        return BAN_PROBE_INTERVAL


class Pacer:
    def __init__(
        self,
        *,
        limit: float = 420.0,
        safety: float = 0.95,
        burst_seconds: float = 2.0,
        probe_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = {
            "limit": limit,
            "safety": safety,
            "burst_seconds": burst_seconds,
            "probe_interval": probe_interval,
        }
        self._clock = clock
        self._budgets: dict[str, MethodBudget] = {}

    def budget(self, method: str) -> MethodBudget:
        found = self._budgets.get(method)
        if found is None:
            found = MethodBudget(clock=self._clock, **self._settings)
            self._budgets[method] = found
        return found

    def plan(self, method: str, wanted_other: int, max_calls: int) -> int:
        """Calls of ``method`` to put in the next batch beside ``wanted_other`` other commands.

        The batch request itself is charged to ``batch`` (half its commands' time): it has to
        fit too. Its cost is learned per request.
        """
        if self.budget("batch").room() < 1:
            return 0
        room = min(self.budget(method).room(), max_calls, MAX_COMMANDS - wanted_other)
        return max(room, 0)

    def wait_time(self, method: str) -> float:
        return max(self.budget(method).wait_time(), self.budget("batch").wait_time())

    def observe(
        self,
        methods: Mapping[str, str],
        result_time: Mapping[str, Any],
        outer: Mapping[str, Any] | None = None,
    ) -> None:
        """Learn from a batch answer: ``methods`` maps command keys to method names."""
        per_method: dict[str, list[float]] = {}
        resets: dict[str, float] = {}
        calls: dict[str, int] = {}
        for key, method in methods.items():
            calls[method] = calls.get(method, 0) + 1
            info = result_time.get(key)
            if isinstance(info, dict) and _number(info.get("operating")) is not None:
                per_method.setdefault(method, []).append(float(info["operating"]))
                reset = _reset_in(info)
                if reset is not None:
                    resets[method] = reset
        for method, totals in per_method.items():
            self.budget(method).report(totals, calls[method], resets.get(method))
        if outer is not None:
            self.observe_call("batch", outer)

    def observe_call(self, method: str, time_block: Mapping[str, Any]) -> None:
        """Learn from a plain call's successful answer."""
        total = _number(time_block.get("operating"))
        if total is not None:
            self.budget(method).report([total], 1, _reset_in(time_block))

    def banned(self, method: str) -> float:
        return self.budget(method).ban()


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _reset_in(time_block: Mapping[str, Any]) -> float | None:
    """Seconds from the answer until ``operating_reset_at``, both by the portal's clock."""
    reset_at = _number(time_block.get("operating_reset_at"))
    finish = _number(time_block.get("finish"))
    if reset_at is None or finish is None:
        return None
    return reset_at - finish
