"""``batch``: references, halt, limits, the request's connector, PHP-shaped answers.

Source: ``CRestProvider::methodsBatch`` (``rest/classes/general/rest_provider.php``) and
``CRestServerBatchItem`` (``rest/classes/general/rest.php``) in ``yuliai/bitrix-modules``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bridge.emulators.bitrix24 import EmulatorServer, FakeClock
from bridge.emulators.bitrix24.phpform import http_build_query
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
    body = batch(client, [f"event.offline.clear?{http_build_query(params)}"])
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


def test_commands_past_the_fiftieth_fail_one_by_one(client: PortalClient) -> None:
    cmd = {f"c{i}": "app.info" for i in range(52)}
    body = batch(client, cmd)["result"]  # still HTTP 200
    assert list(body["result"]) == [f"c{i}" for i in range(50)]
    assert body["result_error"] == {
        f"c{i}": {
            "error": "ERROR_BATCH_LENGTH_EXCEEDED",
            "error_description": "Max batch length exceeded",
        }
        for i in (50, 51)
    }
    assert client.stats()["calls"]["app.info"] == 50
    halted = batch(client, ["app.info"] * 52, halt=1)["result"]
    assert len(halted["result"]) == 50
    assert list(halted["result_error"]) == ["50"]


def test_commands_that_are_not_strings_are_skipped(client: PortalClient) -> None:
    body = batch(client, {"a": "app.info", "b": ["app.info"], "c": "app.info"})["result"]
    assert set(body["result"]) == {"a", "c"}
    assert body["result_error"] == []


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
        emulator_factory(clock=FakeClock(), op_cost_per_call=200, operating_limit=420)
    )
    body = batch(client, ["event.offline.list"] * 4 + ["app.info"])["result"]
    assert list(body["result"]) == ["0", "1", "2", "4"]  # a gap: a JSON object, not a list
    assert body["result_error"]["3"]["error"] == "OPERATION_TIME_LIMIT"
    times = body["result_time"]  # the failed command has no time
    assert list(times) == ["0", "1", "2", "4"]
    assert times["2"]["operating"] == pytest.approx(600, abs=1)
    assert times["2"]["operating_reset_at"] > times["2"]["start"]


def test_the_connector_is_the_batch_requests_not_the_commands(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    """``auth_connector`` is read from the outer request only (``Auth::$authQueryAdditional``);
    inside ``batch`` the outer auth parameters overwrite a command's and the offline methods
    take the connector from ``$server->getAuthData()`` (``rest/lib/api/event.php``)."""
    client = portal_client_factory(emulator_factory(auto_bind=True))
    client.add({"event": LEAD, "data": {"FIELDS": {"ID": "plain"}}})
    client.add({"event": LEAD, "data": {"FIELDS": {"ID": "crm"}}}, connector="crm")

    def ids(reservation: dict[str, Any]) -> list[str]:
        return [e["EVENT_DATA"]["FIELDS"]["ID"] for e in reservation["events"]]

    # A connector inside the command is ignored: the connector-less queue is read.
    inside = batch(client, {"get": "event.offline.get?clear=0&auth_connector=crm"})["result"]
    assert ids(inside["result"]["get"]) == ["plain"]
    assert client.queue("crm")["reserved"] == {}

    # The batch request's own connector applies to every command, whatever they say.
    answer = client.post(
        "batch",
        {
            "auth_connector": "crm",
            "cmd": {
                "get": "event.offline.get?clear=0&auth_connector=",
                "list": "event.offline.list",
                "clear": "event.offline.clear?process_id=$result[get][process_id]",
            },
        },
    ).json()["result"]
    assert ids(answer["result"]["get"]) == ["crm"]
    assert [row["EVENT_DATA"]["FIELDS"]["ID"] for row in answer["result"]["list"]] == ["crm"]
    assert answer["result"]["clear"] is True
    assert client.queue("crm") == {"free": 0, "reserved": {}, "errors": 0}
    assert client.queue("")["free"] == 0
    assert len(client.queue("")["reserved"]) == 1  # the first batch's, untouched


def test_a_reference_walks_as_far_as_its_keys_exist(client: PortalClient) -> None:
    """``CRestUtil::processBatchElement``: a missing key stops the walk where it is."""
    body = batch(
        client,
        {
            "get": "event.offline.get?clear=0&limit=1",
            "whole": "event.offline.list?filter[ID]=$result[get][events][0][ID]",
            "text": "event.offline.list?filter[%25EVENT_NAME]=x$result[get][events][0][ID]",
            "stuck": "event.offline.clear?process_id=$result[get][nothing]",
        },
    )["result"]
    assert [r["ID"] for r in body["result"]["whole"]] == ["1"]
    assert body["result_total"]["text"] == 0  # "x1" is in no event name
    # $result[get][nothing] stops at $result[get]: an array, which is no process_id.
    assert body["result_error"]["stuck"]["error"] == "ERROR_ARGUMENT"
    assert client.queue()["reserved"] != {}


def test_command_methods_are_taken_as_written(client: PortalClient) -> None:
    body = batch(client, {"json": "app.info.json", "upper": "APP.INFO"})["result"]
    assert body["result_error"]["json"]["error"] == "ERROR_METHOD_NOT_FOUND"
    assert "upper" in body["result"]
