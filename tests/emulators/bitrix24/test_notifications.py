"""Notifications the portal sends: their bodies, ONOFFLINEEVENT's edge trigger, install, uninstall.

Sources: ``rest/lib/event/sender.php`` (``event``, ``event_handler_id``, ``data``, ``ts``; the
install URL is a binding of ONAPPINSTALL, ``rest_util.php``) and Bitrix24's event docs in
``bitrix24/b24restdocs`` for the ``auth`` keys (``_includes/auth-params-in-events.md``,
``api-reference/events/on-offline-event.md``, ``api-reference/common/events/on-app-*.md``).
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.emulators.bitrix24 import EmulatorServer, FakeClock
from tests.harness import until
from tests.plugins.emulator import EmulatorFactory, NotificationSink, PortalClient
from tests.waiting import holds

Factory = Callable[[EmulatorServer], PortalClient]
LEAD = "ONCRMLEADADD"
# Documented as always present in an event's auth block.
PORTAL_KEYS = {
    "scope",
    "domain",
    "server_endpoint",
    "status",
    "client_endpoint",
    "member_id",
    "application_token",
}
# The tokens of the user whose action caused the event: documented, plus `expires` and
# `user_id`, which portals send and Bitrix24's Python SDK needs.
USER_KEYS = {"access_token", "expires", "expires_in", "refresh_token", "user_id"}


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
    client.add({**lead(1), "user_id": 7})
    client.control("notify")  # not caused by a user: no tokens
    caused, bare = notification_sink.wait_for(2)
    for notice in (caused, bare):
        assert notice.content_type == "application/x-www-form-urlencoded"
        # An empty `data` is an empty PHP array: http_build_query leaves it out.
        assert list(notice.form) == ["event", "event_handler_id", "ts", "auth"]
        assert b"data" not in notice.body
        assert notice.form["event"] == "ONOFFLINEEVENT"
        assert int(notice.form["ts"]) == int(clock())
    assert caused.form["event_handler_id"] == bare.form["event_handler_id"]
    assert set(bare.form["auth"]) == PORTAL_KEYS
    assert set(caused.form["auth"]) == PORTAL_KEYS | USER_KEYS
    assert caused.form["auth"]["user_id"] == "7"
    app = client.app()
    auth = bare.form["auth"]
    assert auth["domain"] == app["domain"]
    assert auth["member_id"] == app["member_id"]
    assert auth["application_token"] == app["application_token"]
    assert auth["client_endpoint"] == app["client_endpoint"]
    assert auth["server_endpoint"] == "https://oauth.bitrix.info/rest/"
    assert (auth["status"], auth["scope"]) == ("L", "crm")


def test_event_handler_id_is_the_bindings_id(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(emulator_factory(auto_bind=True))
    for path in ("/first", "/second"):
        params = {"event": "ONOFFLINEEVENT", "handler": notification_sink.url + path}
        assert client.result("event.bind", params) is True
    first = {"event": "ONOFFLINEEVENT", "handler": notification_sink.url + "/first"}
    assert client.result("event.unbind", first) == {"count": 1}
    client.control("notify")
    (notice,) = notification_sink.wait_for(1)
    assert notice.path == "/hook/second"
    assert notice.form["event_handler_id"] == "2"  # the second binding made on this portal


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
    # A notification is fired while the add is answered, or never: nothing is scheduled.
    assert client.stats()["notifications"]["sent"] == 1
    assert client.stats()["notifications"]["suppressed"] == 1
    assert len(notification_sink.received) == 1
    client.add(lead(3))
    assert len(notification_sink.wait_for(2)) == 2
    assert client.queue()["free"] == 3


async def test_failed_deliveries_are_never_resent(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    notification_sink.status = 500
    clock = FakeClock()
    client = bound_client(emulator_factory, portal_client_factory, notification_sink, clock, 0)
    client.add(lead(1))
    notification_sink.wait_for(1)
    failed = holds(lambda: client.stats()["notifications"].get("failed") == 1)
    await until(failed, "the failed delivery to be counted", timeout=5)
    assert client.stats()["notifications"]["sent"] == 1  # one attempt, no retry scheduled
    assert len(notification_sink.received) == 1


def test_unbound_events_do_not_notify(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Factory,
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(emulator_factory(handler_url=notification_sink.url))
    assert client.add(lead(1))["ignored"] == 1
    assert client.stats()["notifications"].get("sent", 0) == 0  # none fired, none to come
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
    assert client.control("install")["status"] == 200
    first, second = notification_sink.events("ONAPPINSTALL")
    data, auth = first.form["data"], first.form["auth"]
    assert set(data) == {"VERSION", "ACTIVE", "INSTALLED", "LANGUAGE_ID"}
    assert set(auth) == PORTAL_KEYS | USER_KEYS
    # The install URL is a binding of ONAPPINSTALL: one ID, the same for every install.
    assert first.form["event_handler_id"] == second.form["event_handler_id"]
    assert int(first.form["event_handler_id"]) > 0
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
    assert notice.form["data"] == {"LANGUAGE_ID": "en", "CLEAN": "1"}
    # Sent without tokens, and with exactly the documented keys.
    assert set(notice.form["auth"]) == {
        "domain",
        "server_endpoint",
        "client_endpoint",
        "member_id",
        "application_token",
    }
    assert notice.form["auth"]["application_token"] == client.app()["application_token"]
    assert client.call("app.info", token=token)["error"] == "invalid_token"


def test_notify_without_a_handler_says_so(portal: PortalClient) -> None:
    answer = portal.http.post("/_emulator/notify", json={})
    assert answer.status_code == 409
    assert "handler" in answer.json()["error"]
