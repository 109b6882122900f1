"""The offline queue: at-most-once trap, reservation, coalescing, clear/error/list semantics.

Source: ``rest/lib/api/event.php`` (``eventOffline*``) and ``rest/lib/eventoffline.php``
(``EventOfflineTable``) in ``yuliai/bitrix-modules``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from bridge.emulators.bitrix24 import EmulatorServer, FakeClock
from tests.plugins.emulator import EmulatorFactory, PortalClient

LEAD = "ONCRMLEADADD"


def lead(number: int, user_id: int = 1) -> dict[str, object]:
    return {"event": LEAD, "data": {"FIELDS": {"ID": str(number)}}, "user_id": user_id}


@pytest.fixture
def bound(portal: PortalClient) -> PortalClient:
    portal.bind(LEAD, "ONCRMDEALUPDATE")
    return portal


@pytest.fixture
def clocked(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> tuple[PortalClient, FakeClock]:
    clock = FakeClock()
    client = portal_client_factory(emulator_factory(clock=clock, rate_limit=None))
    client.bind(LEAD)
    return client, clock


def test_get_without_clear_deletes_what_it_returns(bound: PortalClient) -> None:
    bound.add(lead(1), lead(2), lead(3))
    first = bound.result("event.offline.get", {})
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in first["events"]] == ["1", "2", "3"]
    assert first["process_id"] is None
    assert bound.queue() == {"free": 0, "reserved": {}, "errors": 0}
    assert bound.result("event.offline.get", {"clear": 0})["events"] == []


def test_reserved_rows_are_invisible_to_the_next_reservation(bound: PortalClient) -> None:
    bound.add(lead(1), lead(2), lead(3))
    first = bound.result("event.offline.get", {"clear": 0, "limit": 2})
    second = bound.result("event.offline.get", {"clear": 0, "limit": 2})
    assert re.fullmatch(r"[0-9a-f]{32}", first["process_id"])
    assert first["process_id"] != second["process_id"]
    assert [e["ID"] for e in first["events"]] == ["1", "2"]
    assert [e["ID"] for e in second["events"]] == ["3"]
    assert bound.queue()["reserved"] == {first["process_id"]: 2, second["process_id"]: 1}
    # Re-reading by process_id returns the same rows and keeps them reserved.
    again = bound.result("event.offline.get", {"clear": 0, "process_id": first["process_id"]})
    assert again == first
    assert bound.queue()["free"] == 0


def test_row_shape(bound: PortalClient) -> None:
    bound.add(lead(7405, user_id=3))
    (event,) = bound.result("event.offline.get", {"clear": 0})["events"]
    assert set(event) == {
        "ID",
        "TIMESTAMP_X",
        "EVENT_NAME",
        "EVENT_DATA",
        "EVENT_ADDITIONAL",
        "MESSAGE_ID",
    }
    assert isinstance(event["ID"], str)
    assert datetime.fromisoformat(event["TIMESTAMP_X"]).utcoffset() is not None
    assert abs(datetime.fromisoformat(event["TIMESTAMP_X"]).timestamp() - time.time()) < 5
    assert event["EVENT_NAME"] == LEAD
    assert event["EVENT_DATA"] == {"FIELDS": {"ID": "7405"}}
    assert event["EVENT_ADDITIONAL"] == {"user_id": "3"}
    assert re.fullmatch(r"[0-9a-f]{32}", event["MESSAGE_ID"])


def test_event_without_data_has_false(bound: PortalClient) -> None:
    bound.add(LEAD)
    (event,) = bound.result("event.offline.get", {"clear": 0})["events"]
    assert event["EVENT_DATA"] is False


def test_identical_free_event_coalesces_into_the_same_row(
    clocked: tuple[PortalClient, FakeClock],
) -> None:
    client, clock = clocked
    assert client.add(lead(1), lead(2)) == {"added": 2, "coalesced": 0, "ignored": 0}
    before = client.result("event.offline.list", {})
    clock.advance(5)
    assert client.add(lead(1)) == {"added": 0, "coalesced": 1, "ignored": 0}
    after = client.result("event.offline.list", {})
    assert [r["ID"] for r in after] == [r["ID"] for r in before]
    stamp = {r["ID"]: datetime.fromisoformat(r["TIMESTAMP_X"]) for r in after}
    old = {r["ID"]: datetime.fromisoformat(r["TIMESTAMP_X"]) for r in before}
    assert (stamp["1"] - old["1"]).total_seconds() == 5
    # The refreshed row now sorts after the untouched one.
    events = client.result("event.offline.get", {"clear": 0})["events"]
    assert [e["ID"] for e in events] == ["2", "1"]


def test_identical_event_during_reservation_adds_a_row(bound: PortalClient) -> None:
    bound.add(lead(1))
    reservation = bound.result("event.offline.get", {"clear": 0})
    assert bound.add(lead(1)) == {"added": 1, "coalesced": 0, "ignored": 0}
    rows = bound.result("event.offline.list", {})
    assert len(rows) == 2
    assert rows[0]["MESSAGE_ID"] == rows[1]["MESSAGE_ID"]
    assert [r["PROCESS_ID"] for r in rows] == [reservation["process_id"], ""]
    # Different data is a different message.
    bound.add(lead(2))
    assert len({r["MESSAGE_ID"] for r in bound.result("event.offline.list", {})}) == 2


def test_unbound_events_are_not_queued(portal: PortalClient) -> None:
    portal.bind(LEAD, connector="crm")
    assert portal.add(lead(1)) == {"added": 0, "coalesced": 0, "ignored": 1}
    assert portal.add(lead(1), connector="crm")["added"] == 1
    assert portal.queue()["free"] == 0
    assert portal.queue("crm")["free"] == 1


def test_connectors_are_separate_queues(portal: PortalClient) -> None:
    portal.bind(LEAD)
    portal.bind(LEAD, connector="crm")
    portal.add(lead(1))
    portal.add(lead(2), connector="crm")
    from_crm = portal.result("event.offline.get", {"clear": 0, "auth_connector": "crm"})
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in from_crm["events"]] == ["2"]
    plain = portal.result("event.offline.get", {"clear": 0})
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in plain["events"]] == ["1"]


def _reserve(client: PortalClient, count: int) -> tuple[str, list[dict[str, str]]]:
    client.add(*[lead(i) for i in range(1, count + 1)])
    answer = client.result("event.offline.get", {"clear": 0})
    return answer["process_id"], answer["events"]


def test_clear_message_id_wins_over_id(bound: PortalClient) -> None:
    pid, events = _reserve(bound, 3)
    params = {"process_id": pid, "message_id": [events[0]["MESSAGE_ID"]], "id": [events[1]["ID"]]}
    assert bound.result("event.offline.clear", params) is True
    assert bound.queue()["reserved"] == {pid: 2}
    assert bound.result("event.offline.clear", {"process_id": pid, "id": [events[1]["ID"]]})
    left = bound.result("event.offline.get", {"clear": 0, "process_id": pid})["events"]
    assert [e["ID"] for e in left] == [events[2]["ID"]]


def test_clear_touches_only_rows_of_that_process(bound: PortalClient) -> None:
    pid, events = _reserve(bound, 2)
    bound.add(lead(1))  # a free twin of a reserved row
    other = bound.result("event.offline.get", {"clear": 0})["process_id"]
    bound.add(lead(9))
    mids = [e["MESSAGE_ID"] for e in events]
    assert bound.result("event.offline.clear", {"process_id": pid, "message_id": mids}) is True
    assert bound.queue() == {"free": 1, "reserved": {other: 1}, "errors": 0}
    # Clearing again is harmless and still true.
    assert bound.result("event.offline.clear", {"process_id": pid, "message_id": mids}) is True


def test_empty_message_id_list_clears_the_whole_process(bound: PortalClient) -> None:
    pid, _ = _reserve(bound, 3)
    assert bound.result("event.offline.clear", {"process_id": pid, "message_id": []}) is True
    assert bound.queue()["reserved"] == {}


@pytest.mark.parametrize("scalar", ["", "0123456789abcdef0123456789abcdef", 7])
def test_clear_refuses_a_message_id_that_is_not_an_array(
    bound: PortalClient, scalar: object
) -> None:
    pid, events = _reserve(bound, 2)
    if scalar == "0123456789abcdef0123456789abcdef":
        scalar = events[0]["MESSAGE_ID"]  # even a real one, alone
    answer = bound.post("event.offline.clear", {"process_id": pid, "message_id": scalar})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "ERROR_ARGUMENT",
        "error_description": "Value must be array of MESSAGE_ID values",
        "argument": "message_id",
    }
    batched = bound.call(
        "batch", {"cmd": {"c": f"event.offline.clear?process_id={pid}&message_id={scalar}"}}
    )
    assert batched["result"]["result_error"]["c"]["error"] == "ERROR_ARGUMENT"
    assert bound.queue()["reserved"] == {pid: 2}


def test_message_id_is_md5_of_the_name_and_bitrix_json_of_the_data(bound: PortalClient) -> None:
    # md5("ONCRMLEADADD|" . Json::encode(["FIELDS" => ["ID" => "7405"]])), as php computed it
    # for tests/emulators/bitrix24/php_vectors.json.
    bound.add({"event": "onCrmLeadAdd", "data": {"FIELDS": {"ID": "7405"}}})
    (row,) = bound.result("event.offline.get", {})["events"]
    assert row["MESSAGE_ID"] == "b14615ff900d6bd722b0e0e77511eba2"


def test_an_empty_process_id_names_every_unreserved_row(bound: PortalClient) -> None:
    """The module trims and uses it: ``DELETE ... WHERE PROCESS_ID=''`` takes every free row."""
    pid, _ = _reserve(bound, 2)
    bound.add(lead(3), lead(4))
    peek = bound.result("event.offline.get", {"clear": 0, "process_id": ""})
    assert (peek["process_id"], len(peek["events"])) == ("", 2)
    assert bound.queue()["free"] == 2  # read, not reserved
    assert bound.result("event.offline.clear", {"process_id": " "}) is True
    assert bound.queue() == {"free": 0, "reserved": {pid: 2}, "errors": 0}


def test_clear_refuses_bad_arguments(bound: PortalClient) -> None:
    pid, _ = _reserve(bound, 1)
    short = bound.call("event.offline.clear", {"process_id": pid, "message_id": ["abc"]})
    assert short["error"] == "ERROR_ARGUMENT"
    bad_id = bound.call("event.offline.clear", {"process_id": pid, "id": [0]})
    assert bad_id["error"] == "ERROR_ARGUMENT"
    assert bound.call("event.offline.clear", {})["error"] == "ERROR_ARGUMENT"
    assert bound.queue()["reserved"] == {pid: 1}


def test_clear_with_process_id_on_get_deletes_every_row_of_the_process(
    bound: PortalClient,
) -> None:
    pid, _ = _reserve(bound, 3)
    answer = bound.result("event.offline.get", {"process_id": pid, "limit": 1})
    assert len(answer["events"]) == 1
    assert answer["process_id"] == pid
    assert bound.queue() == {"free": 0, "reserved": {}, "errors": 0}


def test_filters_and_order(bound: PortalClient) -> None:
    bound.add(*[lead(i) for i in range(1, 6)])
    bound.add({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "1"}}})

    def ids(params: dict[str, object]) -> list[str]:
        return [e["ID"] for e in bound.result("event.offline.list", params)]

    assert ids({"filter": {">=ID": 4}}) == ["4", "5", "6"]
    assert ids({"filter": {">ID": 2, "<=ID": 4}}) == ["3", "4"]
    assert ids({"filter": {"@ID": [1, 3]}}) == ["1", "3"]
    assert ids({"filter": {"EVENT_NAME": "oncrmdealupdate"}}) == ["6"]
    assert ids({"filter": {"%EVENT_NAME": "DEAL"}}) == ["6"]
    assert ids({"order": {"ID": "DESC"}})[:2] == ["6", "5"]
    desc = bound.result("event.offline.get", {"clear": 0, "limit": 1, "order": {"ID": "DESC"}})
    assert desc["events"][0]["ID"] == "6"
    assert bound.call("event.offline.get", {"filter": {"!ID": 1}})["error"] == "ERROR_ARGUMENT"
    assert bound.call("event.offline.get", {"filter": {"FOO": 1}})["error"] == "ERROR_ARGUMENT"
    assert bound.call("event.offline.get", {"limit": 0})["error"] == "ERROR_ARGUMENT"
    assert bound.call("event.offline.get", {"order": {"ID": "UP"}})["error"] == "ERROR_ARGUMENT"
    assert bound.queue()["free"] == 5  # desc reserved one; refused calls touched nothing


def test_marking_an_error_removes_other_copies_of_the_event(bound: PortalClient) -> None:
    """``markError`` first deletes every non-error row with that MESSAGE_ID outside the process:
    a newer free copy and another process's reservation alike; the marked row keeps its ID."""
    pid, events = _reserve(bound, 2)
    bound.add(lead(1))  # a free twin of the first reserved row
    other = bound.result("event.offline.get", {"clear": 0})["process_id"]  # reserves the twin
    bound.add(lead(1))  # and another free twin
    mid = events[0]["MESSAGE_ID"]
    assert bound.result("event.offline.error", {"process_id": pid, "message_id": [mid]}) is True
    assert bound.queue() == {"free": 0, "reserved": {pid: 1}, "errors": 1}
    assert other not in bound.queue()["reserved"]
    (parked,) = bound.result("event.offline.get", {"clear": 0, "error": 1})["events"]
    assert parked["ID"] == events[0]["ID"]
    refused = bound.call("event.offline.error", {"process_id": pid, "message_id": mid})
    assert refused["error"] == "ERROR_ARGUMENT"


def test_error_rows(bound: PortalClient) -> None:
    pid, events = _reserve(bound, 2)
    params = {"process_id": pid, "message_id": [events[0]["MESSAGE_ID"]]}
    assert bound.result("event.offline.error", params) is True
    assert bound.queue() == {"free": 0, "reserved": {pid: 1}, "errors": 1}
    assert bound.result("event.offline.get", {"clear": 0})["events"] == []
    assert bound.add(lead(1))["coalesced"] == 1  # merges into the error row
    errors = bound.result("event.offline.get", {"clear": 0, "error": 1})
    assert [e["ID"] for e in errors["events"]] == [events[0]["ID"]]
    listed = bound.result("event.offline.list", {"filter": {"ERROR": 1}})
    # Reading error rows reserves them too; they keep their mark.
    assert [(r["ID"], r["PROCESS_ID"]) for r in listed] == [(events[0]["ID"], errors["process_id"])]


def test_list_is_read_only_and_paged(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    client = portal_client_factory(emulator_factory(auto_bind=True))
    client.control("events", {"generate": {"event": LEAD, "count": 120}})
    pid = client.result("event.offline.get", {"clear": 0, "limit": 10})["process_id"]
    first = client.call("event.offline.list", {})
    assert len(first["result"]) == 50
    assert (first["total"], first["next"]) == (120, 50)
    assert set(first["result"][0]) >= {"ID", "PROCESS_ID", "ERROR", "MESSAGE_ID", "TIMESTAMP_X"}
    assert [r["PROCESS_ID"] for r in first["result"][:11]] == [pid] * 10 + [""]
    last = client.call("event.offline.list", {"start": 100})
    assert len(last["result"]) == 20
    assert "next" not in last
    mine = client.call("event.offline.list", {"filter": {"PROCESS_ID": pid}})
    assert mine["total"] == 10
    assert client.queue()["free"] == 110


def test_reservations_stay_fast_on_a_big_queue(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    client = portal_client_factory(emulator_factory(auto_bind=True, rate_limit=None))
    client.control("events", {"generate": {"event": LEAD, "count": 200_000}})
    client.result("event.offline.get", {"clear": 0, "limit": 1})  # warm up the connection
    began = time.perf_counter()
    seen: set[str] = set()
    for _ in range(40):
        answer = client.result("event.offline.get", {"clear": 0, "limit": 50})
        seen.update(e["ID"] for e in answer["events"])
        client.result("event.offline.clear", {"process_id": answer["process_id"]})
    elapsed = time.perf_counter() - began
    assert len(seen) == 2000
    assert elapsed < 4, f"80 calls on a 200k queue took {elapsed:.2f}s"
    assert client.queue()["free"] == 200_000 - 2001


def test_clear_zero_needs_offline_extended(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    client = portal_client_factory(emulator_factory(offline_extended=False, auto_bind=True))
    client.add(lead(1))
    assert client.result("feature.get", {"CODE": "rest_offline_extended"}) == {"value": "N"}
    answer = client.post("event.offline.get", {"clear": 0})
    assert answer.json()["error"] == "WRONG_LICENSE"
    assert client.queue()["free"] == 1


def test_auth_connector_needs_its_feature(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    client = portal_client_factory(emulator_factory(auth_connector_feature=False))
    assert client.result("feature.get", {"code": "rest_auth_connector"}) == {"value": "N"}
    answer = client.call("event.offline.get", {"clear": 0, "auth_connector": "crm"})
    assert answer["error"] == "WRONG_LICENSE"


LONG_TOKENS = 10**9  # tokens that outlive the months these tests skip


def test_the_cleanup_agent_deletes_events_older_than_the_lifetime(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    """``cleanProcessAgent`` deletes rows whose event TIMESTAMP_X is older than
    ``PROCESS_ID_LIFETIME`` (2,952,000 s); the module's current version deletes free rows too
    (older versions: only reserved ones, ``PROCESS_ID<>''``)."""
    clock = FakeClock()
    client = portal_client_factory(
        emulator_factory(clock=clock, auto_bind=True, token_ttl=LONG_TOKENS)
    )
    client.add(lead(1), lead(2))
    pid = client.result("event.offline.get", {"clear": 0, "limit": 1})["process_id"]
    clock.advance(2_952_000 - 100)
    client.add(lead(3))
    assert client.control("cleanup")["deleted"] == 0  # not older than the lifetime yet
    clock.advance(101)
    assert client.control("cleanup") == {"deleted": 2, "now": clock()}
    assert client.queue() == {"free": 1, "reserved": {}, "errors": 0}
    # The reservation is gone: re-reading it finds nothing, clearing it is harmless.
    assert client.result("event.offline.get", {"clear": 0, "process_id": pid})["events"] == []
    assert client.stats()["cleaned"] == 2


def test_the_cleanup_agent_also_runs_by_itself(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    clock = FakeClock()
    client = portal_client_factory(
        emulator_factory(clock=clock, auto_bind=True, cleanup_interval=3600, token_ttl=LONG_TOKENS)
    )
    client.add(lead(1))
    pid = client.result("event.offline.get", {"clear": 0})["process_id"]
    clock.advance(2_952_001)
    # The next request runs the overdue agent before it is served.
    assert client.result("event.offline.get", {"clear": 0, "process_id": pid})["events"] == []
    assert client.queue()["reserved"] == {}
