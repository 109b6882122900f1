"""Diadoc metrics, registered in the application's registry beside the Bitrix24 ones.

Labels are bounded: box ids and the API version come from configuration, outcomes and header
names from fixed lists. Times are exported as Unix timestamps too, so an alert computes the age
itself (``time() - ...``) and keeps counting while the bridge cannot reach Diadoc.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from bridge.metrics import PREFIX

_D = PREFIX + "diadoc_"


class DiadocMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events_published = Counter(
            _D + "events_published_total",
            "Diadoc events confirmed by the broker",
            ["box"],
            registry=r,
        )
        self.late_events = Counter(
            _D + "late_events_total",
            "Events found only by the re-scan behind the cursor (published late)",
            ["box"],
            registry=r,
        )
        self.duplicates = Counter(
            _D + "duplicates_skipped_total",
            "Events not published again because their id was in the seen-set",
            ["box"],
            registry=r,
        )
        self.malformed = Counter(
            _D + "malformed_events_total",
            "Events set aside as malformed (recorded in the state file; the cursor passed them)",
            ["box"],
            registry=r,
        )
        self.tie_overflows = Counter(
            _D + "tie_overflows_total",
            "Pages filled by events sharing one IndexKey: members beyond the page were skipped",
            ["box"],
            registry=r,
        )
        self.requests = Counter(
            _D + "requests_total", "Diadoc API requests by outcome", ["outcome"], registry=r
        )
        self.token_refreshes = Counter(
            _D + "token_refreshes_total",
            "OpenID Connect refreshes by outcome",
            ["outcome"],
            registry=r,
        )
        self.api_notices = Counter(
            _D + "api_deprecation_notices_total",
            "Answers announcing the retirement of the API version in use (Sunset, Deprecation)",
            ["version", "header"],
            registry=r,
        )
        self.api_sunset = Gauge(
            _D + "api_sunset_timestamp_seconds",
            "When Diadoc says the API version in use will be removed (its Sunset header)",
            ["version"],
            registry=r,
        )
        self.lag = Gauge(
            _D + "lag_seconds",
            "Seconds since the box's feed was last read to its end with everything confirmed",
            ["box"],
            registry=r,
        )
        self.caught_up = Gauge(
            _D + "caught_up_timestamp_seconds",
            "When the box's feed was last read to its end with everything confirmed",
            ["box"],
            registry=r,
        )
        self.last_answer = Gauge(
            _D + "last_answer_timestamp_seconds",
            "When Diadoc last answered a read of the box's feed",
            ["box"],
            registry=r,
        )
        self.last_event = Gauge(
            _D + "last_event_timestamp_seconds",
            "Timestamp of the newest event the box's cursor passed (confirmed by the broker)",
            ["box"],
            registry=r,
        )

    def track_lag(
        self, box: str, since: Callable[[], float | None], now: Callable[[], float]
    ) -> None:
        """Compute the box's lag when scraped: it grows during an outage instead of freezing."""

        def lag() -> float:
            caught_up = since()
            return 0.0 if caught_up is None else max(0.0, now() - caught_up)

        self.lag.labels(box=box).set_function(lag)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, DiadocMetrics] = (
    weakref.WeakKeyDictionary()
)


def diadoc_metrics(registry: CollectorRegistry) -> DiadocMetrics:
    """The registry's Diadoc metrics, created once (registering a name twice is an error)."""
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = DiadocMetrics(registry)
    return found
