"""``batch``: references, halt, limits, PHP-shaped answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bridge import phpquery
from bridge.emulator import EmulatorServer, FakeClock
from tests.plugins.emulator import EmulatorFactory, PortalClient

LEAD = "ONCRMLEADADD"


@pytest.fixture
def client(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> PortalClient:
    made = portal_client_factory(emulator_factory(auto_bind=True))
    made.control("events", {"generate": {"event": LEAD, "count": 5}})
    return made


def batch(client: PortalClient, cmd: Any, halt: int = 0) -> dict[str, Any]:
    answer = client.post("batch", {"halt": halt, "cmd": cmd})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_reserve_and_clear_by_reference(client: PortalClient) -> None:
    body = batch(
        client,
        {
            "get": "event.offline.get?clear=0&limit=3",
            "clear": "event.offline.clear?process_id=$result[get][process_id]",
        },
    )
    result = body["result"]
    assert set(result) == {"result", "result_error", "result_total", "result_next", "result_time"}
    assert len(result["result"]["get"]["events"]) == 3
    assert result["result"]["clear"] is True
    assert result["result_error"] == []  # an empty PHP array
    assert set(result["result_time"]) == {"get", "clear"}
    assert client.queue() == {"free": 2, "reserved": {}, "errors": 0}


@pytest.mark.parametrize("style", ["[]", "[0]"])
def test_message_id_arrays_in_both_php_styles(client: PortalClient, style: str) -> None:
    reserved = client.result("event.offline.get", {"clear": 0, "limit": 3})
    mids = [e["MESSAGE_ID"] for e in reserved["events"][:2]]
    parts = [
        f"message_id{style if style == '[]' else f'[{i}]'}={mid}" for i, mid in enumerate(mids)
    ]
    query = f"process_id={reserved['process_id']}&" + "&".join(parts)
    body = batch(client, {"clear": f"event.offline.clear?{query}"})
    assert body["result"]["result"]["clear"] is True
    assert client.queue()["reserved"] == {reserved["process_id"]: 1}


def test_url_encoded_values_and_encoder_output(client: PortalClient) -> None:
    reserved = client.result("event.offline.get", {"clear": 0, "limit": 2})
    params = {
        "process_id": reserved["process_id"],
        "message_id": [e["MESSAGE_ID"] for e in reserved["events"]],
    }
    body = batch(client, [f"event.offline.clear?{phpquery.encode(params)}"])
    assert body["result"]["result"] == [True]  # list cmd, keys 0..n-1: a JSON list
    assert client.queue()["reserved"] == {}


def test_total_and_next_references(client: PortalClient) -> None:
    client.control("events", {"generate": {"event": LEAD, "count": 70, "start_id": 100}})
    body = batch(
        client,
        {
            "first": "event.offline.list",
            "second": "event.offline.list?start=$next[first]",
            "third": "event.offline.list?filter[>ID]=$total[first]",
        },
    )
    result = body["result"]
    assert result["result_total"] == {"first": 75, "second": 75, "third": 0}
    assert result["result_next"] == {"first": 50}
    assert len(result["result"]["second"]) == 25
    assert result["result"]["third"] == []


def test_more_than_fifty_commands_are_refused(client: PortalClient) -> None:
    answer = client.post("batch", {"cmd": ["app.info"] * 51})
    assert answer.json()["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"
    assert len(batch(client, ["app.info"] * 50)["result"]["result"]) == 50


def test_nested_batch_is_refused_per_command(client: PortalClient) -> None:
    body = batch(client, {"inner": "batch?cmd[a]=app.info", "ok": "app.info"})
    assert body["result"]["result_error"]["inner"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert "ok" in body["result"]["result"]


def test_halt_stops_at_the_first_failure(client: PortalClient) -> None:
    cmd = {"bad": "event.offline.get?limit=0", "get": "event.offline.get?clear=0"}
    halted = batch(client, cmd, halt=1)["result"]
    assert set(halted["result_error"]) == {"bad"}
    assert halted["result"] == []
    assert client.queue()["free"] == 5
    went_on = batch(client, cmd, halt=0)["result"]
    assert went_on["result_error"]["bad"]["error"] == "ERROR_ARGUMENT"
    assert len(went_on["result"]["get"]["events"]) == 5


def test_batch_is_one_request_for_the_rate_limit(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    clock = FakeClock()
    client = portal_client_factory(emulator_factory(clock=clock, rate_burst=2))
    client.token  # noqa: B018 - fetch the token before counting
    for _ in range(3):
        assert "result" in client.call("batch", {"cmd": ["app.info"] * 20})
    assert client.call("app.info")["error"] == "QUERY_LIMIT_EXCEEDED"
    calls = client.http.get("/_emulator/calls").json()
    assert calls == {"batch": 3, "app.info": 61}


def test_limits_inside_a_batch_are_reported_per_command(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    client = portal_client_factory(
        emulator_factory(clock=FakeClock(), op_cost_per_call=200, operating_budget=480)
    )
    body = batch(client, ["event.offline.list"] * 4 + ["app.info"])["result"]
    assert list(body["result"]) == ["0", "1", "2", "4"]  # a gap: a JSON object, not a list
    error = body["result_error"]["3"]
    assert error["error"] == "OPERATION_TIME_LIMIT"
    times = body["result_time"]  # every command has a time: keys 0..4, so a JSON list
    assert times[3]["operating_reset_at"] > times[3]["start"]
    assert times[2]["operating"] == pytest.approx(600, abs=1)
