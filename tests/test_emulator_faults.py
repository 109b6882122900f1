"""Injected faults: 5xx answers, chosen errors, latency, and the lost reservation."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from bridge.emulator import EmulatorServer
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
