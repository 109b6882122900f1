"""Operating time per method: the ``rest`` module's ``LoadLimiter`` (version 2).

Modelled on ``rest/lib/engine/access/loadlimiter.php`` (``bitrix24`` module source as mirrored in
``yuliai/bitrix-modules``):

- time is kept per method in one-minute buckets; a method's total is the sum of the ten
  buckets up to the current minute (the minute the request started in);
- one request's time for a method is added to the bucket when the request ends, and only
  if it is above ``MINIMAL_FIX`` (0.1 s); ``batch`` is charged half its duration;
- before a call runs, a method whose total is above the limit is banned for ``BAN_SECONDS``
  and its buckets are emptied; every call during the ban is refused, whatever the total;
- ``time.operating`` is the total, this request's calls of more than 0.1 s included;
  ``time.operating_reset_at`` is when the oldest bucket expires (its first request's start
  plus ten minutes), the ban's end during a ban, or this request's start plus ten minutes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

BUCKET_SECONDS = 60
BUCKETS = 10
WINDOW = BUCKET_SECONDS * BUCKETS
BAN_SECONDS = 300
MINIMAL_FIX = 0.1
BATCH_WEIGHT = 0.5
BATCH = "batch"


def _weight(method: str) -> float:
    return BATCH_WEIGHT if method == BATCH else 1.0


@dataclass(slots=True)
class Bucket:
    seconds: float
    expires_at: float  # the first charged request's start + ten minutes


@dataclass(slots=True)
class Meter:
    """One request's registered calls (``$timeRegistered``): method -> durations."""

    started: float
    minute: int
    durations: dict[str, list[float]] = field(default_factory=dict)
    first_start: dict[str, float] = field(default_factory=dict)

    def register(self, method: str, start: float, seconds: float) -> None:
        self.first_start.setdefault(method, start)
        self.durations.setdefault(method, []).append(seconds)

    def counted(self, method: str) -> float:
        """What getRestTime adds for this request: each call above the threshold."""
        weight = _weight(method)
        return sum(d * weight for d in self.durations.get(method, ()) if d * weight > MINIMAL_FIX)


class LoadLimiter:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._buckets: dict[str, dict[int, Bucket]] = {}
        self.bans: dict[str, float] = {}  # method -> end of the ban
        self.bans_imposed: Counter[str] = Counter()

    def meter(self, now: float) -> Meter:
        return Meter(started=now, minute=int(now // BUCKET_SECONDS))

    def _live(self, method: str, minute: int, now: float) -> dict[int, Bucket]:
        buckets = self._buckets.get(method, {})
        for key in [k for k, b in buckets.items() if k <= minute - BUCKETS or b.expires_at <= now]:
            del buckets[key]
        return buckets

    def banned_until(self, method: str, now: float) -> float | None:
        until = self.bans.get(method)
        if until is not None and until <= now:
            del self.bans[method]
            return None
        return until

    def used(self, method: str, now: float, meter: Meter | None = None) -> float:
        minute = meter.minute if meter is not None else int(now // BUCKET_SECONDS)
        total = sum(b.seconds for b in self._live(method, minute, now).values())
        return total + (meter.counted(method) if meter is not None else 0.0)

    def blocked(self, method: str, now: float, meter: Meter) -> bool:
        """``LoadLimiter::is``: true while banned; a total above the limit starts a ban."""
        if self.banned_until(method, now) is not None:
            return True
        if self.used(method, now, meter) > self.limit:
            self.bans[method] = now + BAN_SECONDS
            self.bans_imposed[method] += 1
            # The buckets would otherwise outlive the ban and ban the method again at once.
            self._buckets.pop(method, None)
            return True
        return False

    def reset_at(self, method: str, now: float, meter: Meter) -> int | None:
        until = self.banned_until(method, now)
        if until is not None:
            return int(now) + round(until - now)
        live = self._live(method, meter.minute, now)
        for minute in sorted(live):
            if live[minute].seconds > 0:
                return int(live[minute].expires_at)
        if meter.first_start:
            return int(next(iter(meter.first_start.values())) + WINDOW)
        return None

    def finalize(self, meter: Meter, now: float) -> None:
        """The request ended: each method's time above the threshold goes to its bucket."""
        for method, durations in meter.durations.items():
            seconds = sum(durations) * _weight(method)
            if seconds > MINIMAL_FIX:
                self.add(method, seconds, meter.first_start[method], meter.minute, now)

    def add(self, method: str, seconds: float, start: float, minute: int, now: float) -> None:
        buckets = self._live(method, minute, now)
        self._buckets[method] = buckets
        found = buckets.get(minute)
        if found is None:
            buckets[minute] = Bucket(seconds, start + WINDOW)
        else:
            found.seconds += seconds

    def spend(self, method: str, seconds: float, now: float) -> None:
        """Charge time as if requests had just run (the control API's pre-spent budget)."""
        self.add(method, seconds, now, int(now // BUCKET_SECONDS), now)

    def snapshot(self, now: float) -> dict[str, dict[str, float | None]]:
        methods = set(self._buckets) | set(self.bans)
        return {
            method: {
                "used": round(self.used(method, now), 6),
                "banned_until": self.banned_until(method, now),
            }
            for method in sorted(methods)
        }

    def reset(self) -> None:
        self._buckets.clear()
        self.bans.clear()
        self.bans_imposed.clear()
