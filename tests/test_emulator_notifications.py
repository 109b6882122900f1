"""Notifications the portal sends: ONOFFLINEEVENT's edge trigger, install and uninstall."""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.emulator import EmulatorServer, FakeClock
from tests.plugins.emulator import EmulatorFactory, NotificationSink, PortalClient

Factory = Callable[[EmulatorServer], PortalClient]
LEAD = "ONCRMLEADADD"
QUIET = 0.4  # long enough for a stray notification to arrive over loopback


def lead(number: int) -> dict[str, object]:
    return {"event": LEAD, "data": {"FIELDS": {"ID": str(number)}}}


def bound_client(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    sink: NotificationSink,
    clock: FakeClock,
    min_timeout: int = 10,
) -> PortalClient:
    client = portal_client_factory(emulator_factory(clock=clock))
    client.bind(LEAD)
    params = {
        "event": "ONOFFLINEEVENT",
        "handler": sink.url,
        "options": {"minTimeout": min_timeout},
    }
    assert client.result("event.bind", params) is True
    return client


def test_offline_event_notification_body(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    clock = FakeClock()
    client = bound_client(emulator_factory, portal_client_factory, notification_sink, clock)
    client.add(lead(1))
    (notice,) = notification_sink.wait_for(1)
    assert notice.content_type == "application/x-www-form-urlencoded"
    assert notice.form["event"] == "ONOFFLINEEVENT"
    assert notice.form["data"] == ""
    assert int(notice.form["ts"]) == int(clock())
    app = client.app()
    auth = notice.form["auth"]
    assert auth["domain"] == app["domain"]
    assert auth["member_id"] == app["member_id"]
    assert auth["application_token"] == app["application_token"]
    assert auth["client_endpoint"] == app["client_endpoint"]
    assert auth["server_endpoint"].endswith("/rest/")
    assert auth["status"] == "L"


def test_suppressed_within_min_timeout_and_never_sent_later(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    clock = FakeClock()
    client = bound_client(emulator_factory, portal_client_factory, notification_sink, clock)
    client.add(lead(1))
    notification_sink.wait_for(1)
    clock.advance(5)
    client.add(lead(2))  # during suppression: dropped, not postponed
    clock.advance(20)
    time.sleep(QUIET)
    assert len(notification_sink.received) == 1
    assert client.stats()["notifications"]["suppressed"] == 1
    client.add(lead(3))
    assert len(notification_sink.wait_for(2)) == 2
    assert client.queue()["free"] == 3


def test_failed_deliveries_are_never_resent(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    notification_sink.status = 500
    clock = FakeClock()
    client = bound_client(emulator_factory, portal_client_factory, notification_sink, clock, 0)
    client.add(lead(1))
    notification_sink.wait_for(1)
    time.sleep(QUIET)
    assert len(notification_sink.received) == 1
    assert client.stats()["notifications"]["failed"] == 1


def test_unbound_events_do_not_notify(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(emulator_factory(handler_url=notification_sink.url))
    assert client.add(lead(1))["ignored"] == 1
    time.sleep(QUIET)
    assert notification_sink.received == []


def test_bound_handler_wins_over_the_default(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(
        emulator_factory(handler_url=notification_sink.url + "/default", auto_bind=True)
    )
    client.add(lead(1))
    assert notification_sink.wait_for(1)[0].path == "/hook/default"
    client.result("event.bind", {"event": "ONOFFLINEEVENT", "handler": notification_sink.url})
    assert client.control("notify")["status"] == 200
    assert notification_sink.wait_for(2)[1].path == "/hook"


def test_install_carries_a_working_admin_refresh_token_and_drops_bindings(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(emulator_factory(handler_url=notification_sink.url))
    client.bind(LEAD)
    assert client.control("install")["status"] == 200
    (notice,) = notification_sink.events("ONAPPINSTALL")
    data, auth = notice.form["data"], notice.form["auth"]
    assert set(data) == {"VERSION", "ACTIVE", "INSTALLED", "LANGUAGE_ID"}
    assert set(auth) >= {
        "access_token",
        "refresh_token",
        "expires_in",
        "application_token",
        "member_id",
        "domain",
        "client_endpoint",
        "server_endpoint",
        "scope",
        "status",
    }
    assert client.refresh(auth["refresh_token"]).json()["member_id"] == auth["member_id"]
    assert client.call("user.admin", token=auth["access_token"])["result"] is True
    assert client.result("event.get") == []  # reinstalling drops every binding


def test_uninstall(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(emulator_factory(handler_url=notification_sink.url))
    token = client.token
    assert client.control("uninstall", {"clean": True})["status"] == 200
    (notice,) = notification_sink.events("ONAPPUNINSTALL")
    assert notice.form["data"] == {"CLEAN": "1"}
    assert notice.form["auth"]["application_token"] == client.app()["application_token"]
    assert client.call("app.info", token=token)["error"] == "invalid_token"


def test_notify_without_a_handler_says_so(portal: PortalClient) -> None:
    answer = portal.http.post("/_emulator/notify", json={})
    assert answer.status_code == 409
    assert "handler" in answer.json()["error"]
