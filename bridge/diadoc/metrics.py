"""Diadoc metrics, registered in the application's registry beside the Bitrix24 ones.

Labels are bounded: box ids come from configuration, outcomes from a fixed list.
"""

from __future__ import annotations

import weakref

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
        self.requests = Counter(
            _D + "requests_total", "Diadoc API requests by outcome", ["outcome"], registry=r
        )
        self.token_refreshes = Counter(
            _D + "token_refreshes_total",
            "OpenID Connect refreshes by outcome",
            ["outcome"],
            registry=r,
        )
        self.lag = Gauge(
            _D + "lag_seconds",
            "Seconds since the box's feed was last read to its end with everything confirmed",
            ["box"],
            registry=r,
        )


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, DiadocMetrics] = (
    weakref.WeakKeyDictionary()
)


def diadoc_metrics(registry: CollectorRegistry) -> DiadocMetrics:
    """The registry's Diadoc metrics, created once (registering a name twice is an error)."""
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = DiadocMetrics(registry)
    return found
