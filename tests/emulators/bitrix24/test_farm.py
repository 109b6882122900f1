"""Many portals in one emulator: each one whole and apart, one OAuth server, one call log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.emulators.bitrix24 import cli as emulator_cli
from bridge.emulators.bitrix24.farm import addresses
from tests.plugins.emulator import NotificationSink, PortalClient


@pytest.fixture
def farm(notification_sink: NotificationSink, tmp_path: Path) -> Iterator[EmulatorServer]:
    config = EmulatorConfig(handler_url=notification_sink.url, min_timeout=0, rate_limit=None)
    server = EmulatorServer(
        config, portals=2, call_log_path=str(tmp_path / "calls.jsonl"), call_log_size=50
    ).start()
    yield server
    server.stop()


@pytest.fixture
def portals(farm: EmulatorServer) -> Iterator[tuple[PortalClient, PortalClient]]:
    listed = httpx.get(f"{farm.base_url}/_farm/portals").json()["portals"]
    first, second = (PortalClient(farm, p["base_url"]) for p in listed)
    yield first, second
    first.close()
    second.close()


def _farm_get(farm: EmulatorServer, path: str, **params: Any) -> Any:
    response = httpx.get(f"{farm.base_url}/_farm/{path}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_two_portals_are_whole_and_apart(
    farm: EmulatorServer,
    portals: tuple[PortalClient, PortalClient],
    notification_sink: NotificationSink,
) -> None:
    first, second = portals
    a, b = first.app(), second.app()
    for key in ("member_id", "domain", "application_token", "client_endpoint"):
        assert a[key] != b[key], key
    assert (a["client_id"], a["oauth_url"]) == (b["client_id"], b["oauth_url"])  # one app
    assert b["domain"].split(":")[1] == a["domain"].split(":")[1]  # one port

    first.bind("ONCRMLEADADD")
    assert first.add({"event": "ONCRMLEADADD", "data": {"ID": 1}})["added"] == 1
    # Portal 2 never bound the event offline: its queue stays empty, as any portal's would.
    assert second.add({"event": "ONCRMLEADADD", "data": {"ID": 1}})["ignored"] == 1
    assert first.http.get("/_emulator/queue").json()["free"] == 1
    assert second.http.get("/_emulator/queue").json()["free"] == 0

    # A token of one portal means nothing to another.
    assert second.call("event.offline.get", token=first.token)["error"] == "invalid_token"
    events = first.result("event.offline.get", {"limit": 10})["events"]
    assert [e["EVENT_DATA"] for e in events] == [{"ID": 1}]

    # One portal's operating time is its own.
    spend = {"method": "event.offline.get", "seconds": 500}
    assert first.http.post("/_emulator/operating", json=spend).status_code == 200
    assert first.call("event.offline.get")["error"] == "OPERATION_TIME_LIMIT"
    assert "result" in second.call("event.offline.get")

    # The ONOFFLINEEVENT came from portal 1, with portal 1's credentials.
    (notice,) = notification_sink.wait_for(1)
    auth = notice.form["auth"]
    assert (auth["member_id"], auth["application_token"], auth["domain"]) == (
        a["member_id"],
        a["application_token"],
        a["domain"],
    )

    stats = _farm_get(farm, "stats")["portals"]
    assert stats[a["member_id"]]["time_limited"] == 1
    assert stats[a["member_id"]]["bans_imposed"] == 1
    assert stats[b["member_id"]]["time_limited"] == 0
    queues = _farm_get(farm, "queues")
    assert queues[a["member_id"]] == {
        "free": 0,
        "reserved": 0,
        "errors": 0,
        "delivered": 1,
        "cleared": 1,
    }
    assert queues[b["member_id"]]["delivered"] == 0


def test_one_oauth_server_refreshes_each_portal_and_refuses_a_token_twice(
    farm: EmulatorServer, portals: tuple[PortalClient, PortalClient]
) -> None:
    first, second = portals
    oauth = PortalClient(farm)  # the first portal's address: where the OAuth server is
    try:
        for portal in portals:
            app = portal.app()
            answer = oauth.refresh(app["refresh_token"])
            assert answer.status_code == 200, answer.text
            grant = answer.json()
            assert (grant["member_id"], grant["client_endpoint"]) == (
                app["member_id"],
                app["client_endpoint"],
            )
            # The new access token works on its own portal only.
            assert "result" in portal.call("app.info", token=grant["access_token"])
            other = second if portal is first else first
            refused = other.call("app.info", token=grant["access_token"])
            assert refused["error"] == "invalid_token"
            # Strict rotation: the token just presented is dead.
            again = oauth.refresh(app["refresh_token"])
            assert again.json()["error"] == "invalid_grant"
        assert oauth.refresh("never-issued").json()["error"] == "invalid_grant"
    finally:
        oauth.close()
    stats = _farm_get(farm, "stats")
    for portal in portals:
        assert stats["portals"][portal.app()["member_id"]]["invalid_grant"] == 1
    assert stats["unattributed"] == {"invalid_grant": 1}
    assert stats["totals"]["invalid_grant"] == 3


def test_the_call_log_names_replica_and_epoch_and_pages(
    farm: EmulatorServer, portals: tuple[PortalClient, PortalClient], tmp_path: Path
) -> None:
    first, second = portals
    first_id, second_id = first.app()["member_id"], second.app()["member_id"]
    assert second.token  # the client refreshes its own first, whatever token a call sends
    start = _farm_get(farm, "calls", since=0, limit=0)["total"]
    token = first.token  # one OAuth call, without headers
    for n in range(3):
        headers = {"X-Bridge-Replica": f"r{n}", "X-Bridge-Epoch": str(n + 7)}
        first.post("app.info", token=token, headers=headers)
    second.post("app.info", token=token)  # another portal's token: refused, logged as such

    page = _farm_get(farm, "calls", since=start, limit=2)
    assert [c["seq"] for c in page["calls"]] == [start, start + 1]
    oauth_call, rest_call = page["calls"]
    assert (oauth_call["kind"], oauth_call["member_id"], oauth_call["outcome"]) == (
        "oauth",
        first_id,
        "ok",
    )
    assert oauth_call["replica"] is None
    assert (rest_call["method"], rest_call["replica"], rest_call["epoch"]) == (
        "app.info",
        "r0",
        "7",
    )
    rest = _farm_get(farm, "calls", since=page["next"])
    assert [(c["replica"], c["epoch"]) for c in rest["calls"]] == [
        ("r1", "8"),
        ("r2", "9"),
        (None, None),
    ]
    refused = rest["calls"][-1]
    assert (refused["member_id"], refused["outcome"], refused["status"]) == (
        second_id,
        "invalid_token",
        401,
    )
    assert rest["next"] == start + 5 == rest["total"]
    assert _farm_get(farm, "calls", since=rest["next"])["calls"] == []

    # Memory is a ring (50 here): a reader left behind learns how much it lost.
    for _ in range(60):
        first.post("feature.get", {"code": "rest_offline_extended"}, token=token)
    behind = _farm_get(farm, "calls", since=0, limit=5)
    assert behind["lost"] == behind["total"] - 50
    assert behind["calls"][0]["seq"] == behind["lost"]
    # The file keeps every call.
    lines = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [entry["seq"] for entry in lines] == list(range(behind["total"]))


def test_the_call_log_lists_the_commands_of_a_batch(
    farm: EmulatorServer, portals: tuple[PortalClient, PortalClient]
) -> None:
    first, _ = portals
    token = first.token
    start = _farm_get(farm, "calls", since=0, limit=0)["total"]
    cmd = {"get": "event.offline.get?clear=0&limit=3", "info": "APP.INFO", "odd": 7}
    assert first.post("batch", {"cmd": cmd}, token=token).status_code == 200
    assert first.post("app.info", token=token).status_code == 200
    batch, plain = _farm_get(farm, "calls", since=start)["calls"]
    # A batch's entry names the methods it carried (in order; a non-string command is none).
    assert (batch["method"], batch["commands"]) == ("batch", ["event.offline.get", "app.info"])
    assert (plain["method"], plain["commands"]) == ("app.info", None)


def test_farm_control_adds_events_and_installs_every_portal(
    farm: EmulatorServer, notification_sink: NotificationSink
) -> None:
    listed = _farm_get(farm, "portals")["portals"]
    members = [p["member_id"] for p in listed]
    installed = httpx.post(f"{farm.base_url}/_farm/install", json={}).json()["installed"]
    assert [(i["member_id"], i["status"]) for i in installed] == [(m, 200) for m in members]
    installs = notification_sink.events("ONAPPINSTALL")
    assert sorted(n.form["auth"]["member_id"] for n in installs) == sorted(members)
    for notice in installs:
        auth = notice.form["auth"]
        (own,) = [p for p in listed if p["member_id"] == auth["member_id"]]
        assert (auth["application_token"], auth["client_endpoint"]) == (
            own["application_token"],
            own["client_endpoint"],
        )

    # Bindings vanished with the install; bind offline on each portal, then add to all.
    for portal in listed:
        client = PortalClient(farm, portal["base_url"])
        try:
            client.bind("ONCRMLEADADD")
        finally:
            client.close()
    body = {"generate": {"event": "ONCRMLEADADD", "count": 3}}
    added = httpx.post(f"{farm.base_url}/_farm/events", json=body).json()
    assert added == {m: {"added": 3, "coalesced": 0, "ignored": 0} for m in members}
    one = {**body, "portal": "2"}
    assert list(httpx.post(f"{farm.base_url}/_farm/events", json=one).json()) == [members[1]]
    queues = _farm_get(farm, "queues")
    assert [queues[m]["free"] for m in members] == [3, 3]  # the same three events coalesced
    refused = httpx.post(f"{farm.base_url}/_farm/events", json={**body, "portal": "9"})
    assert refused.status_code == 400
    assert "no portal" in refused.json()["error"]


def test_portals_take_consecutive_loopback_addresses_or_refuse_clearly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert addresses("127.0.0.1", 3) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert addresses("localhost", 1) == ["localhost"]  # one portal: anywhere, as before
    for host, count in (("localhost", 2), ("10.0.0.1", 2), ("127.255.255.255", 2)):
        with pytest.raises(ValueError, match="loopback"):
            addresses(host, count)
    with pytest.raises(ValueError, match="public-host"):
        EmulatorServer(EmulatorConfig(public_host="portal.example"), portals=2)
    assert emulator_cli.main(["--portals", "2", "--host", "0.0.0.0"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("emulator: more than one portal needs --host on 127.0.0.0/8")


def test_the_call_log_stamps_a_call_when_it_arrives_not_when_it_is_answered(
    farm: EmulatorServer, portals: tuple[PortalClient, PortalClient]
) -> None:
    first, _ = portals
    token = first.token
    assert first.http.post("/_emulator/faults", json={"latency_ms": 300}).status_code == 200
    sent = time.monotonic()
    first.post("app.info", token=token)
    answered = time.monotonic()
    (entry,) = _farm_get(farm, "calls", since=_farm_get(farm, "calls")["total"] - 1)["calls"]
    assert entry["method"] == "app.info"
    # The emulator runs in this process: one monotonic clock. The answer waited out the latency.
    assert sent <= entry["monotonic"] <= answered - 0.3
