"""The request-rate leaky bucket, on an injected clock (operating time: test_operating.py)."""

from __future__ import annotations

from collections.abc import Callable

from bridge.emulators.bitrix24 import EmulatorServer, FakeClock
from bridge.emulators.bitrix24.limits import LeakyBucket
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


def test_leaky_bucket_unit() -> None:
    bucket = LeakyBucket(rate=1, burst=1)
    assert [bucket.hit(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.hit(10.0)
