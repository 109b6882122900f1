"""Tokens, OAuth, request formats and who may call what."""

from __future__ import annotations

from collections.abc import Callable

from bridge.emulators.bitrix24 import EmulatorServer, FakeClock
from tests.plugins.emulator import EmulatorFactory, NotificationSink, PortalClient

TIME_KEYS = {
    "start",
    "finish",
    "duration",
    "processing",
    "date_start",
    "date_finish",
    "operating",
    "operating_reset_at",
}


def test_refresh_answer_names_the_portal_only_in_client_endpoint(
    emulator: EmulatorServer, portal: PortalClient
) -> None:
    app = portal.app()
    answer = portal.refresh(app["refresh_token"])
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) >= {
        "access_token",
        "refresh_token",
        "expires",
        "expires_in",
        "member_id",
        "client_endpoint",
        "server_endpoint",
        "domain",
        "scope",
        "status",
        "user_id",
    }
    assert body["client_endpoint"] == emulator.client_endpoint == f"{emulator.base_url}/rest/"
    assert body["member_id"] == app["member_id"]
    assert body["domain"] != emulator.domain  # the OAuth server's, not the portal's
    assert body["refresh_token"] != app["refresh_token"]
    assert app["domain"] == emulator.domain == f"127.0.0.1:{emulator.port}"


def test_refresh_tokens_rotate_strictly(portal: PortalClient) -> None:
    first = portal.app()["refresh_token"]
    second = portal.refresh(first).json()["refresh_token"]
    reused = portal.refresh(first)
    assert reused.json()["error"] == "invalid_grant"
    assert portal.refresh(second).status_code == 200
    assert portal.refresh(second).json()["error"] == "invalid_grant"


def test_refresh_errors(portal: PortalClient) -> None:
    token = portal.app()["refresh_token"]
    assert portal.refresh(token, client_secret="wrong").json()["error"] == "invalid_client"
    assert portal.refresh(token, grant_type="password").json()["error"] == "invalid_request"
    # A refused attempt does not burn the token; a POSTed form works as well as GET.
    app = portal.app()
    form = {
        "grant_type": "refresh_token",
        "client_id": app["client_id"],
        "client_secret": app["client_secret"],
        "refresh_token": token,
    }
    assert portal.http.post("/oauth/token/", data=form).status_code == 200


def test_access_tokens_expire(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
) -> None:
    clock = FakeClock()
    client = portal_client_factory(emulator_factory(clock=clock, token_ttl=60))
    assert "result" in client.call("app.info")
    clock.advance(61)
    answer = client.post("app.info")
    assert (answer.status_code, answer.json()["error"]) == (401, "expired_token")
    fresh = client.new_token()
    assert "result" in client.call("app.info", token=fresh)


def test_token_errors(portal: PortalClient) -> None:
    missing = portal.post("app.info", token=None)
    assert missing.json()["error"] == "NO_AUTH_FOUND"
    unknown = portal.post("app.info", token="nope")
    assert (unknown.status_code, unknown.json()["error"]) == (401, "invalid_token")


def test_success_has_result_and_full_time_block(portal: PortalClient) -> None:
    answer = portal.post("feature.get", {"CODE": "rest_offline_extended"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["result"] == {"value": "Y"}
    assert set(body["time"]) == TIME_KEYS
    assert body["time"]["finish"] >= body["time"]["start"]


def test_request_formats(emulator: EmulatorServer, portal: PortalClient) -> None:
    token = portal.token
    http = portal.http
    form = http.post("/rest/feature.get", data={"auth": token, "CODE": "rest_auth_connector"})
    assert form.json()["result"] == {"value": "Y"}
    bearer = http.post("/rest/app.info.json", json={}, headers={"Authorization": f"Bearer {token}"})
    assert bearer.json()["result"]["STATUS"] == "L"
    query = http.get("/rest/user.admin", params={"auth": token})
    assert query.json()["result"] is True
    unknown = portal.post("crm.lead.teleport")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "ERROR_METHOD_NOT_FOUND")
    broken = http.post("/rest/app.info", content=b"{", headers={"Content-Type": "application/json"})
    assert broken.json()["error"] == "ERROR_ARGUMENT"


def test_webhook_urls_are_refused(portal: PortalClient) -> None:
    answer = portal.http.post("/rest/1/abcdef123456/event.offline.get.json", json={})
    assert (answer.status_code, answer.json()["error"]) == (403, "WRONG_AUTH_TYPE")


def test_user_tokens_from_notifications_are_not_admin_tokens(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
    notification_sink: NotificationSink,
) -> None:
    client = portal_client_factory(
        emulator_factory(handler_url=notification_sink.url, auto_bind=True)
    )
    client.add({"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": "1"}}, "user_id": 2})
    (notice,) = notification_sink.wait_for(1)
    auth = notice.form["auth"]
    assert auth["user_id"] == "2"
    denied = client.post("event.offline.get", {"clear": 0}, token=auth["access_token"])
    assert (denied.status_code, denied.json()["error"]) == (403, "ACCESS_DENIED")
    bind = client.call("event.bind", {"event": "ONCRMDEALADD"}, token=auth["access_token"])
    assert bind["error"] == "ACCESS_DENIED"
    # Harmless methods still work for that user.
    assert client.call("user.admin", token=auth["access_token"])["result"] is False
    assert client.queue()["free"] == 1


def test_expire_tokens_fault(portal: PortalClient) -> None:
    assert "result" in portal.call("app.info")
    portal.control("faults", {"expire_tokens": True})
    assert portal.call("app.info")["error"] == "expired_token"
