"""Diadoc's response headers: Retry-After, and the Sunset/Deprecation of an API version."""

from __future__ import annotations

import logging

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bridge.diadoc.headers import ApiNotices, http_time, retry_after
from bridge.diadoc.metrics import DiadocMetrics

# 3 April 2027, the removal date Kontur announces for GetDocflowEvents V2 and V3.
SUNSET = "Sat, 03 Apr 2027 00:00:00 GMT"
SUNSET_TS = 1806710400.0


def answer(**headers: str) -> httpx.Response:
    return httpx.Response(200, headers=headers)


def test_http_dates() -> None:
    assert http_time(SUNSET) == SUNSET_TS
    assert http_time("@1806710400") == SUNSET_TS  # RFC 9745 Deprecation
    assert http_time("true") is None
    assert http_time("@soon") is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after(answer(**{"Retry-After": "120"})) == 120
    assert retry_after(answer(**{"Retry-After": SUNSET}), now=SUNSET_TS - 90) == 90
    assert retry_after(answer(**{"Retry-After": SUNSET}), now=SUNSET_TS + 90) == 0
    assert retry_after(answer(**{"Retry-After": "-5"})) == 0
    assert retry_after(answer(**{"Retry-After": "later"})) is None
    assert retry_after(answer()) is None
    assert retry_after(None) is None


def test_notices_are_counted_every_time_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    notices = ApiNotices(DiadocMetrics(registry), "V3")
    caplog.set_level(logging.WARNING, logger="bridge.diadoc.headers")
    for _ in range(3):
        notices.check(answer(Sunset=SUNSET, Link='<https://x>; rel="sunset"'))
    notices.check(answer(Deprecation="@1800000000"))
    notices.check(answer())

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"bitrix24_bridge_diadoc_{name}", labels)

    assert sample("api_deprecation_notices_total", version="V3", header="sunset") == 3
    assert sample("api_deprecation_notices_total", version="V3", header="deprecation") == 1
    assert sample("api_sunset_timestamp_seconds", version="V3") == SUNSET_TS
    lines = [r for r in caplog.records if "retirement" in r.getMessage()]
    # The header and its value are logging extras.
    assert [(r.__dict__["header"], r.__dict__["value"]) for r in lines] == [
        ("Sunset", SUNSET),
        ("Deprecation", "@1800000000"),
    ]
