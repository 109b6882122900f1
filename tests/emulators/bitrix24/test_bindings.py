"""``event.bind``, ``event.get``, ``event.unbind``, ``feature.get``, ``app.info``."""

from __future__ import annotations

import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.plugins.emulator import PortalClient


def test_bind_get_unbind(portal: PortalClient) -> None:
    offline = {"event": "onCrmLeadAdd", "event_type": "offline", "auth_connector": "crm"}
    assert portal.result("event.bind", offline) is True
    twice = portal.post("event.bind", offline)
    assert twice.json()["error"] == "ERROR_CORE"
    assert "already binded" in twice.json()["error_description"]
    online = {"event": "ONOFFLINEEVENT", "handler": "http://127.0.0.1:9/hook"}
    assert portal.result("event.bind", {**online, "options": {"minTimeout": 5}}) is True
    assert portal.call("event.bind", online)["error"] == "ERROR_CORE"
    assert sorted(portal.result("event.get"), key=lambda b: b["offline"]) == [
        {"event": "ONOFFLINEEVENT", "handler": online["handler"], "auth_type": "0", "offline": 0},
        {"event": "ONCRMLEADADD", "connector_id": "crm", "offline": 1},
    ]
    assert portal.result("event.unbind", offline) == {"count": 1}
    assert portal.result("event.unbind", offline) == {"count": 0}
    assert portal.result("event.unbind", online) == {"count": 1}
    assert portal.result("event.get") == []


def test_bind_refuses_nonsense(portal: PortalClient) -> None:
    offline_notifier = {"event": "ONOFFLINEEVENT", "event_type": "offline"}
    assert portal.call("event.bind", offline_notifier)["error"] == "ERROR_ARGUMENT"
    assert portal.call("event.bind", {"event": "ONCRMLEADADD"})["error"] == "ERROR_ARGUMENT"
    assert portal.call("event.bind", {})["error"] == "ERROR_ARGUMENT"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://localhost:8080/bitrix24/events", "ERROR_WRONG_HANDLER_URL"),
        ("http://bridge:8080/bitrix24/events", "ERROR_WRONG_HANDLER_URL"),
        ("http://[::1]:8080/bitrix24/events", "ERROR_WRONG_HANDLER_URL"),
        ("http://.example/events", "ERROR_WRONG_HANDLER_URL"),
        ("bridge.example.com/events", "ERROR_WRONG_HANDLER_URL"),
        ("ftp://bridge.example.com/events", "ERROR_UNSUPPORTED_PROTOCOL"),
    ],
)
def test_a_handler_url_needs_a_dotted_host_and_http(
    portal: PortalClient, url: str, code: str
) -> None:
    """``HandlerHelper::checkCallback`` (``rest/lib/handlerhelper.php``): the host must hold a
    dot after its first character; only then is the scheme checked."""
    answer = portal.post("event.bind", {"event": "ONOFFLINEEVENT", "handler": url})
    assert (answer.status_code, answer.json()["error"]) == (400, code)
    assert portal.result("event.get") == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "https://b24-bridge.example.com/bitrix24/events"]
)
def test_dotted_handlers_are_accepted(portal: PortalClient, url: str) -> None:
    assert portal.result("event.bind", {"event": "ONOFFLINEEVENT", "handler": url}) is True


def test_feature_and_app_info(portal: PortalClient) -> None:
    assert portal.result("feature.get", {"CODE": "rest_offline_extended"}) == {"value": "Y"}
    assert portal.result("feature.get", {"CODE": "something_else"}) == {"value": "N"}
    info = portal.result("app.info")
    assert info["CODE"] == portal.app()["client_id"]
    assert info["STATUS"] == "L"


def test_state_is_reachable_in_the_emulators_loop(
    emulator: EmulatorServer, portal: PortalClient
) -> None:
    portal.bind("ONCRMLEADADD")
    portal.add("ONCRMLEADADD")
    state = emulator.portal
    assert state is not None
    assert emulator.run_in_loop(lambda: state.store.queue("").free_count) == 1
