"""Prometheus metrics. One registry per application, so tests and the demo don't collide.

Label values are bounded: event names, REST method names, outcomes and portal domains
(a handful per installation). Never ids or tokens.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "bitrix24_bridge_"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_published = Counter(
            PREFIX + "events_published_total",
            "Events confirmed by the broker",
            ["event"],
            registry=r,
        )
        self.events_cleared = Counter(
            PREFIX + "events_cleared_total",
            "Events removed from the upstream queue",
            ["event"],
            registry=r,
        )
        self.publish_failures = Counter(
            PREFIX + "publish_failures_total",
            "Messages the broker did not confirm, by reason",
            ["reason"],
            registry=r,
        )
        self.rest_calls = Counter(
            PREFIX + "rest_calls_total",
            "Bitrix24 REST calls (batch sub-calls included) by method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.drain_passes = Counter(
            PREFIX + "drain_passes_total",
            "Drain passes by outcome",
            ["portal", "outcome"],
            registry=r,
        )
        self.drain_duration = Histogram(
            PREFIX + "drain_pass_duration_seconds",
            "Duration of drain passes",
            ["portal"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
            registry=r,
        )
        self.events_per_request = Histogram(
            PREFIX + "events_per_request",
            "Events moved by one REST request",
            buckets=(0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.inflight = Gauge(
            PREFIX + "inflight_reservations", "Reservations in the journal", ["portal"], registry=r
        )
        self.queue_depth = Gauge(
            PREFIX + "upstream_queue_depth",
            "Events waiting in the portal's queue",
            ["portal"],
            registry=r,
        )
        # A timestamp, not an age: an age set on each poll freezes at its last value when the
        # queue empties or polling stops, so an alert on it never clears (or never fires).
        # ``time() - timestamp`` keeps growing while the event waits; the series is removed
        # while the queue is empty.
        self.oldest_timestamp = Gauge(
            PREFIX + "oldest_pending_event_timestamp_seconds",
            "Unix time of the oldest event waiting in the portal's queue; absent while empty",
            ["portal"],
            registry=r,
        )
        self.token_refreshes = Counter(
            PREFIX + "token_refreshes_total",
            "OAuth token refreshes by outcome",
            ["outcome"],
            registry=r,
        )
        # Counters an alert takes increase() of start at 0: a series born at 1 has no increase,
        # so the first failure would go unseen.
        for outcome in ("ok", "failed"):
            self.token_refreshes.labels(outcome=outcome)
        for reason in ("nack", "returned", "timeout", "connection", "missing_exchange"):
            self.publish_failures.labels(reason=reason)
        self.notifications = Counter(
            PREFIX + "notifications_total",
            "Notifications received by event and outcome",
            ["event", "outcome"],
            registry=r,
        )
        # One child per (event, outcome), looked up once: counted on every request.
        self._notification_counts: dict[tuple[str, str], Counter] = {}
        self.broker_connected = Gauge(
            PREFIX + "broker_connected", "1 while the broker connection is open", registry=r
        )
        self.portal_stopped = Gauge(
            PREFIX + "portal_stopped",
            "1 while a configuration error stops the portal's drain",
            ["portal"],
            registry=r,
        )

        self.events_parked = Counter(
            PREFIX + "events_parked_total",
            "Events taken out of the way with event.offline.error (or kept in the state file) "
            "after the broker kept refusing them, or because they are malformed",
            ["event", "reason"],
            registry=r,
        )
        self.binding_failed = Gauge(
            PREFIX + "binding_failed",
            "1 while the offline bindings or the ONOFFLINEEVENT handler could not be made",
            ["portal"],
            registry=r,
        )
        self.operating_bans = Counter(
            PREFIX + "operating_bans_total",
            "OPERATION_TIME_LIMIT answers: a method banned by the portal's operating-time limit",
            ["method"],
            registry=r,
        )

        # Scaled mode (BRIDGE_STATE_URL); 0 otherwise.
        self.shards_held = Gauge(
            PREFIX + "shards_held", "Shards whose lease this replica holds", registry=r
        )
        self.lease_renew_failures = Counter(
            PREFIX + "lease_renew_failures_total",
            "Lease rounds that could not reach the state database",
            registry=r,
        )

    def add_portal(self, portal: str) -> None:
        """A portal's series, at 0 from the start (see the counters above)."""
        for outcome in ("ok", "failed", "stopped"):
            self.drain_passes.labels(portal=portal, outcome=outcome)
        self.portal_stopped.labels(portal=portal).set(0)
        self.binding_failed.labels(portal=portal).set(0)

    def count_notification(self, event: str, outcome: str) -> None:
        """``notifications_total{event, outcome}`` + 1; the caller keeps the labels bounded."""
        child = self._notification_counts.get((event, outcome))
        if child is None:
            child = self.notifications.labels(event, outcome)
            self._notification_counts[(event, outcome)] = child
        child.inc()
