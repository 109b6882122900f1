"""Injected faults: every error of the table, latency, the lost reservation, a domain change."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.plugins.emulator import EmulatorFactory, PortalClient


@pytest.fixture
def client(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> PortalClient:
    made = portal_client_factory(emulator_factory(auto_bind=True))
    made.control("events", {"generate": {"event": "ONCRMLEADADD", "count": 5}})
    return made


def test_fail_answers_500_without_acting(client: PortalClient) -> None:
    client.control("faults", {"fail": {"event.offline.get": 2}})
    for _ in range(2):
        answer = client.post("event.offline.get", {"clear": 0})
        assert (answer.status_code, answer.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert client.queue()["free"] == 5
    assert len(client.result("event.offline.get", {"clear": 0})["events"]) == 5


def test_fail_counts_calls_inside_a_batch(client: PortalClient) -> None:
    client.control("faults", {"fail": {"app.info": 1}})
    body = client.call("batch", {"cmd": ["app.info", "app.info"]})["result"]
    assert body["result_error"][0]["error"] == "INTERNAL_SERVER_ERROR"  # key 0 alone: a list
    assert list(body["result"]) == ["1"]


@pytest.mark.parametrize(
    ("code", "status"),
    [("QUERY_LIMIT_EXCEEDED", 503), ("OPERATION_TIME_LIMIT", 429), ("expired_token", 401)],
)
def test_fail_with_a_chosen_error(client: PortalClient, code: str, status: int) -> None:
    client.control("faults", {"fail_with": {"event.offline.clear": {"error": code, "count": 1}}})
    answer = client.post("event.offline.clear", {"process_id": "x" * 32})
    assert (answer.status_code, answer.json()["error"]) == (status, code)
    assert client.result("event.offline.clear", {"process_id": "x" * 32}) is True


def test_lost_reservation(client: PortalClient) -> None:
    client.control("faults", {"drop_next_reservation": True})
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("event.offline.get", {"clear": 0, "limit": 3})
    # The server acted: the rows are reserved under a process the client never heard of.
    queue = client.queue()
    assert queue["free"] == 2
    ((pid, count),) = queue["reserved"].items()
    assert count == 3
    listed = client.result("event.offline.list", {})
    orphaned = {row["PROCESS_ID"] for row in listed if row["PROCESS_ID"]}
    assert orphaned == {pid}
    # Only one answer is lost; the orphan can be recovered by its process_id.
    again = client.result("event.offline.get", {"clear": 0, "process_id": pid})
    assert len(again["events"]) == 3
    assert client.result("event.offline.clear", {"process_id": pid}) is True
    assert client.queue() == {"free": 2, "reserved": {}, "errors": 0}


def test_an_empty_reservation_does_not_use_up_the_drop(client: PortalClient) -> None:
    client.result("event.offline.get", {})  # empty the queue
    client.control("faults", {"drop_next_reservation": True})
    assert client.result("event.offline.get", {"clear": 0})["events"] == []
    client.add({"event": "ONCRMLEADADD"})
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("event.offline.get", {"clear": 0})


def test_lost_reservation_inside_a_batch(client: PortalClient) -> None:
    client.control("faults", {"drop_next_reservation": True})
    cmd = {"list": "event.offline.list", "get": "event.offline.get?clear=0&limit=2"}
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("batch", {"cmd": cmd})
    assert list(client.queue()["reserved"].values()) == [2]
    assert "result" in client.call("batch", {"cmd": cmd})


def test_latency(client: PortalClient) -> None:
    client.token  # noqa: B018 - not part of the measurement
    client.control("faults", {"latency_ms": 200})
    began = time.perf_counter()
    assert "result" in client.call("app.info")
    assert time.perf_counter() - began >= 0.2


# Each code of BITRIX24.md's error table, with the status a portal usually sends.
TABLE = [
    ("QUERY_LIMIT_EXCEEDED", 503),
    ("OPERATION_TIME_LIMIT", 429),
    ("expired_token", 401),
    ("invalid_token", 401),
    ("INTERNAL_SERVER_ERROR", 500),
    ("ERROR_UNEXPECTED_ANSWER", 500),
    ("OVERLOAD_LIMIT", 503),
    ("WRONG_LICENSE", 403),
    ("ACCESS_DENIED", 403),
    ("WRONG_AUTH_TYPE", 403),
    ("insufficient_scope", 401),
    ("NO_AUTH_FOUND", 401),
    ("ERROR_METHOD_NOT_FOUND", 404),
    ("ERROR_ARGUMENT", 400),
    ("PORTAL_DELETED", 403),
    ("APPLICATION_NOT_FOUND", 401),
    ("PAYMENT_REQUIRED", 402),
    ("authorization_error", 401),
    ("user_access_error", 401),
    ("INVALID_CREDENTIALS", 401),
    ("METHOD_CONFIRM_WAITING", 401),
    ("METHOD_CONFIRM_DENIED", 403),
    ("ERROR_OAUTH", 401),
    ("CONNECTION_ERROR", 401),
]


@pytest.mark.parametrize(("code", "status"), TABLE)
def test_every_error_of_the_table_can_be_injected(
    client: PortalClient, code: str, status: int
) -> None:
    client.control("faults", {"fail_with": {"event.offline.get": {"error": code, "count": 2}}})
    plain = client.post("event.offline.get", {"clear": 0})
    assert plain.status_code == status
    assert plain.json()["error"] == code
    assert "time" not in plain.json()  # an error answer never has a time block
    body = client.call("batch", {"cmd": {"get": "event.offline.get?clear=0", "ok": "app.info"}})
    assert body["result"]["result_error"]["get"]["error"] == code
    assert set(body["result"]["result_time"]) == {"ok"}
    assert client.queue()["free"] == 5  # nothing was reserved
    assert len(client.result("event.offline.get", {"clear": 0})["events"]) == 5  # used up


def test_a_persistent_fault_stays_until_cleared(client: PortalClient) -> None:
    client.control(
        "faults", {"fail_with": {"*": {"error": "APPLICATION_NOT_FOUND", "persistent": True}}}
    )
    for method in ("app.info", "event.offline.get", "batch"):
        for _ in range(3):
            answer = client.post(method, {"cmd": ["app.info"]})
            assert (answer.status_code, answer.json()["error"]) == (401, "APPLICATION_NOT_FOUND")
    state = client.control("faults", {})
    assert state["fail_with"]["*"] == {
        "error": "APPLICATION_NOT_FOUND",
        "count": None,
        "persistent": True,
        "status": 401,
    }
    client.control("faults", {"fail_with": {"*": None}})
    assert "result" in client.call("app.info")


def test_a_fault_may_carry_another_status(client: PortalClient) -> None:
    spec = {"error": "PORTAL_DELETED", "status": 500, "description": "gone"}
    client.control("faults", {"fail_with": {"app.info": spec}})
    answer = client.post("app.info")
    assert answer.status_code == 500
    assert answer.json() == {"error": "PORTAL_DELETED", "error_description": "gone"}


def test_clear_ends_every_fault(client: PortalClient) -> None:
    client.control(
        "faults",
        {
            "fail_with": {"*": {"error": "ERROR_OAUTH", "persistent": True}},
            "latency_ms": 1,
            "drop_next_reservation": True,
        },
    )
    state = client.control("faults", {"clear": True})
    assert (state["fail_with"], state["latency_ms"], state["drop_next_reservation"]) == (
        {},
        None,
        False,
    )
    assert "result" in client.call("app.info")


@pytest.mark.parametrize(
    "body",
    [
        {"fail_with": {"app.info": {"count": 1}}},
        {"fail_with": {"app.info": {"error": "X", "status": 99}}},
        {"fail_with": {"app.info": "X"}},
        {"moved_to": "ftp://elsewhere"},
        {"latency_ms": 5, "fail": {"app.info": "many"}},
    ],
)
def test_a_bad_fault_changes_nothing(client: PortalClient, body: dict[str, object]) -> None:
    answer = client.http.post("/_emulator/faults", json=body)
    assert answer.status_code == 400
    assert "bad faults" in answer.json()["error"]
    state = client.control("faults", {})
    assert (state["fail_with"], state["latency_ms"], state["moved_to"]) == ({}, None, None)


def test_a_domain_change_redirects_the_old_address(client: PortalClient) -> None:
    """A portal whose domain changed answers 302 to the same path on the new domain."""
    new_base = f"http://localhost:{client.server.port}"  # the same server, by another name
    client.control("faults", {"moved_to": new_base})
    moved = client.http.post("/rest/app.info.json?x=1", json={"auth": client.token})
    assert moved.status_code == 302
    assert moved.headers["location"] == f"{new_base}/rest/app.info.json?x=1"
    with httpx.Client(base_url=new_base) as there:
        answer = there.post("/rest/app.info.json", json={"auth": client.token})
        assert "result" in answer.json()
    # The OAuth server and the notifications now name the new address.
    assert client.app()["client_endpoint"] == f"{new_base}/rest/"
    assert client.refresh(client.app()["refresh_token"]).json()["client_endpoint"] == (
        f"{new_base}/rest/"
    )
    client.control("faults", {"moved_to": None})
    assert client.post("app.info").status_code == 200
