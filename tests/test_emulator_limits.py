"""The leaky bucket and the operating-time budget, on an injected clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.emulator import EmulatorServer, FakeClock
from bridge.emulator.limits import LeakyBucket, OperatingTime
from tests.plugins.emulator import EmulatorFactory, PortalClient

Factory = Callable[[EmulatorServer], PortalClient]


def test_requests_above_the_burst_are_refused_until_the_bucket_drains(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    clock = FakeClock()
    client = portal_client_factory(emulator_factory(clock=clock, rate_limit=2, rate_burst=5))
    client.token  # noqa: B018 - OAuth is another server: not counted
    statuses = [client.post("app.info").status_code for _ in range(7)]
    assert statuses == [200] * 6 + [503]
    assert client.call("app.info")["error"] == "QUERY_LIMIT_EXCEEDED"
    clock.advance(1.5)  # drains 3: from 8 to 5, which is not above the burst
    assert "result" in client.call("app.info")
    assert client.call("app.info")["error"] == "QUERY_LIMIT_EXCEEDED"
    assert client.stats()["errors"] == {"QUERY_LIMIT_EXCEEDED": 3}


def test_unlimited_rate(emulator_factory: EmulatorFactory, portal_client_factory: Factory) -> None:
    client = portal_client_factory(emulator_factory(rate_limit=None, rate_burst=1))
    assert all("result" in client.call("app.info") for _ in range(10))


def test_operating_time_limit(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    clock = FakeClock(start=1_700_000_000)
    client = portal_client_factory(
        emulator_factory(clock=clock, rate_limit=None, op_cost_per_call=100)
    )
    operating = [client.call("event.offline.list")["time"]["operating"] for _ in range(5)]
    assert operating == pytest.approx([100, 200, 300, 400, 500], abs=0.5)
    refused = client.post("event.offline.list")
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "OPERATION_TIME_LIMIT"
    assert body["time"]["operating_reset_at"] == 1_700_000_000 // 60 * 60 + 600
    # Other methods have their own budget.
    assert "result" in client.call("app.info")
    clock.advance(600)
    assert "result" in client.call("event.offline.list")


def test_rows_cost_operating_time(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(
        emulator_factory(auto_bind=True, op_cost_per_call=0.01, op_cost_per_row=0.001)
    )
    client.control("events", {"generate": {"event": "ONCRMLEADADD", "count": 50}})
    answer = client.call("event.offline.get", {"clear": 0, "limit": 50})
    assert answer["time"]["operating"] == pytest.approx(0.06, abs=0.01)


def test_leaky_bucket_unit() -> None:
    bucket = LeakyBucket(rate=1, burst=1)
    assert [bucket.hit(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.hit(10.0)


def test_operating_window_slides_by_the_minute() -> None:
    meter = OperatingTime(budget=10)
    meter.charge("m", 6, now=0)
    meter.charge("m", 6, now=300)
    assert meter.exceeded("m", now=301)
    assert meter.reset_at("m", now=301) == 600
    assert not meter.exceeded("m", now=600)
    assert meter.used("m", now=600) == 6
