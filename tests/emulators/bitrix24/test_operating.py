"""Operating time as the ``rest`` module's LoadLimiter v2 counts it, on an injected clock.

Source: ``rest/lib/engine/access/loadlimiter.php`` (``BAN_DURATION = 300``,
``BATCH_TIME_WEIGHT = 0.5``, ``$limitTime = 420``, ``$minimalFixTime = 0.1``, ten one-minute
buckets) and ``rest/classes/general/rest.php`` (``processCall`` asks ``LoadLimiter::is`` before
the method runs; ``appendDebugInfo`` writes ``operating`` and ``operating_reset_at`` into the
``time`` of successful answers only), as mirrored in ``yuliai/bitrix-modules``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer, FakeClock
from bridge.emulators.bitrix24.operating import BAN_SECONDS, LoadLimiter
from tests.plugins.emulator import EmulatorFactory, PortalClient

Factory = Callable[[EmulatorServer], PortalClient]
T0 = 1_700_000_020.0  # 40 s into a minute: bucket arithmetic is visible
LIST = "event.offline.list"


def run(limiter: LoadLimiter, now: float, **durations: list[float]) -> None:
    """One request whose calls of each method took ``durations`` seconds."""
    meter = limiter.meter(now)
    for method, seconds in durations.items():
        for each in seconds:
            meter.register(method.replace("_", "."), now, each)
    limiter.finalize(meter, now)


def test_a_requests_time_of_at_most_a_tenth_of_a_second_is_not_counted() -> None:
    limiter = LoadLimiter(420)
    run(limiter, T0, m=[0.05, 0.05])  # 0.10: not above the threshold
    assert limiter.used("m", T0) == 0
    run(limiter, T0, m=[0.06, 0.06])  # the request's total counts, not each call
    assert limiter.used("m", T0) == pytest.approx(0.12)


def test_batch_is_charged_half_its_duration() -> None:
    limiter = LoadLimiter(420)
    run(limiter, T0, batch=[0.18])  # half of it is 0.09: not counted
    run(limiter, T0, batch=[0.8])
    assert limiter.used("batch", T0) == pytest.approx(0.4)


def test_the_window_is_ten_buckets_of_a_minute() -> None:
    limiter = LoadLimiter(420)
    run(limiter, T0, m=[6])
    run(limiter, T0 + 300, m=[6])
    assert limiter.used("m", T0 + 300) == 12
    # The first bucket (minute of T0) leaves the window ten minutes after its minute began.
    assert limiter.used("m", T0 - 40 + 599) == 12
    assert limiter.used("m", T0 - 40 + 600) == 6


def test_above_the_limit_the_method_is_banned_for_a_fixed_time() -> None:
    limiter = LoadLimiter(420)
    limiter.spend("m", 421, T0)
    meter = limiter.meter(T0)
    assert limiter.blocked("m", T0, meter)
    assert limiter.bans_imposed["m"] == 1
    # The buckets are emptied, but the ban holds whatever the total, then ends.
    assert limiter.used("m", T0) == 0
    assert limiter.blocked("m", T0 + BAN_SECONDS - 1, limiter.meter(T0 + BAN_SECONDS - 1))
    assert not limiter.blocked("m", T0 + BAN_SECONDS, limiter.meter(T0 + BAN_SECONDS))
    assert not limiter.blocked("other", T0, limiter.meter(T0))


def test_reset_at_is_when_the_oldest_bucket_expires() -> None:
    limiter = LoadLimiter(420)
    run(limiter, T0, m=[1])
    run(limiter, T0 + 130, m=[1])
    meter = limiter.meter(T0 + 200)
    assert limiter.reset_at("m", T0 + 200, meter) == int(T0) + 600
    # Nothing charged yet: this request's start plus ten minutes.
    fresh = limiter.meter(T0)
    fresh.register("n", T0, 0.01)
    assert limiter.reset_at("n", T0, fresh) == int(T0) + 600
    limiter.bans["m"] = T0 + 250
    assert limiter.reset_at("m", T0 + 200, meter) == int(T0) + 250


def test_limit_is_a_setting_defaulting_to_420() -> None:
    assert EmulatorConfig().operating_limit == 420
    assert EmulatorConfig(operating_budget=480).operating_limit == 480  # the former name


def test_ban_over_http(emulator_factory: EmulatorFactory, portal_client_factory: Factory) -> None:
    clock = FakeClock(start=T0)
    client = portal_client_factory(
        emulator_factory(clock=clock, rate_limit=None, op_cost_per_call=100)
    )
    operating = [client.call(LIST)["time"]["operating"] for _ in range(5)]
    # The fifth call still ran: before it the total was 400, not above 420.
    assert operating == pytest.approx([100, 200, 300, 400, 500], abs=0.5)
    refused = client.post(LIST)
    assert refused.status_code == 429
    assert refused.json() == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": "Method is blocked due to operation time limit.",
    }  # no time block on an error
    assert "result" in client.call("app.info")  # other methods have their own budget
    clock.advance(BAN_SECONDS - 1)
    assert client.call(LIST)["error"] == "OPERATION_TIME_LIMIT"  # the total is 0, the ban holds
    clock.advance(1)
    assert client.call(LIST)["time"]["operating"] == pytest.approx(100, abs=0.5)
    stats = client.stats()
    assert stats["bans_imposed"] == {LIST: 1}
    assert stats["errors"] == {"OPERATION_TIME_LIMIT": 2}


def test_reset_at_over_http(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    clock = FakeClock(start=T0)
    client = portal_client_factory(emulator_factory(clock=clock, op_cost_per_call=1))
    first = client.call(LIST)["time"]
    clock.advance(130)
    later = client.call(LIST)["time"]
    assert first["operating_reset_at"] == later["operating_reset_at"] == int(T0) + 600


def test_small_calls_count_only_together_in_one_request(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(
        emulator_factory(clock=FakeClock(start=T0), rate_limit=None, op_cost_per_call=0.06)
    )
    for _ in range(5):
        client.call("app.info")
    assert client.stats()["operating"]["app.info"] < 0.06  # each request was under 0.1 s
    answer = client.call("batch", {"cmd": ["app.info"] * 3})["result"]
    # Inside the request each call is under the threshold; afterwards the three count.
    assert answer["result_time"][2]["operating"] < 0.06
    assert client.stats()["operating"]["app.info"] == pytest.approx(0.18, abs=0.01)


def test_batch_is_charged_half_of_its_whole_duration(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(
        emulator_factory(clock=FakeClock(start=T0), rate_limit=None, op_cost_per_call=0.2)
    )
    client.call("batch", {"cmd": [LIST] * 4})
    operating = client.stats()["operating"]
    assert operating[LIST] == pytest.approx(0.8, abs=0.02)
    # The batch lasted its commands' 0.8 s plus its own 0.2 s: half of that is charged.
    assert operating["batch"] == pytest.approx(0.5, abs=0.02)


def test_a_banned_batch_runs_no_command(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(emulator_factory(clock=FakeClock(start=T0)))
    client.control("operating", {"method": "batch", "seconds": 421})
    refused = client.post("batch", {"cmd": {"get": "event.offline.get?clear=0"}})
    assert (refused.status_code, refused.json()["error"]) == (429, "OPERATION_TIME_LIMIT")
    assert "event.offline.get" not in client.stats()["calls"]


def test_a_restart_can_begin_with_most_of_the_budget_spent(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(
        emulator_factory(clock=FakeClock(start=T0), rate_limit=None, op_cost_per_call=10)
    )
    spent = client.control("operating", {"method": "event.offline.get", "seconds": 395})
    assert spent == {
        "method": "event.offline.get",
        "operating": 395,
        "banned_until": None,
        "limit": 420,
    }
    totals = [client.call("event.offline.get", {"clear": 0})["time"]["operating"] for _ in range(3)]
    assert totals == pytest.approx([405, 415, 425], abs=0.5)
    assert client.call("event.offline.get", {"clear": 0})["error"] == "OPERATION_TIME_LIMIT"
    assert client.stats()["bans"] == {"event.offline.get": T0 + BAN_SECONDS}


def test_operating_control_refuses_nonsense(portal: PortalClient) -> None:
    for body in ({}, {"method": ""}, {"method": "m", "seconds": -1}, {"method": "m", "ban": 0}):
        answer = portal.http.post("/_emulator/operating", json=body)
        assert answer.status_code == 400, body
    assert portal.stats()["operating"] == {}


def test_modelled_costs_per_call_and_row(
    emulator_factory: EmulatorFactory, portal_client_factory: Factory
) -> None:
    client = portal_client_factory(
        emulator_factory(auto_bind=True, op_cost_per_call=0.05, op_cost_per_row=0.002)
    )
    client.control("events", {"generate": {"event": "ONCRMLEADADD", "count": 50}})
    answer = client.call("event.offline.get", {"clear": 0, "limit": 50})
    assert answer["time"]["operating"] == pytest.approx(0.15, abs=0.01)
