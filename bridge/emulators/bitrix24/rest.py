"""Every REST method the emulator knows, except the offline queue's own (see ``offline.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from bridge.emulators.bitrix24 import batch, offline, params
from bridge.emulators.bitrix24.errors import RestError, argument
from bridge.emulators.bitrix24.model import Call, Method, Outcome
from bridge.emulators.bitrix24.portal import APP_VERSION, OnlineBinding

FEATURES = ("rest_offline_extended", "rest_auth_connector")


def _already() -> RestError:
    return RestError("ERROR_CORE", "Handler already binded")


def check_callback(url: str) -> None:
    """``HandlerHelper::checkCallback``: a host with a dot (not first), then http or https."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        host = ""
    if host.find(".") <= 0:
        raise RestError("ERROR_WRONG_HANDLER_URL")
    if parts.scheme not in ("http", "https"):
        raise RestError("ERROR_UNSUPPORTED_PROTOCOL")


def event_bind(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    event = params.required(call, "EVENT").upper()
    if params.text(p.get("EVENT_TYPE")).lower() == "offline":
        if event == "ONOFFLINEEVENT":
            raise argument("Offline event cannot be registered for this event.")
        key = (event, call.connector)
        if key in portal.offline:
            raise _already()
        portal.offline.add(key)
        return Outcome(True)
    handler = params.required(call, "HANDLER")
    check_callback(handler)
    options = p.get("OPTIONS")
    min_timeout = None
    if isinstance(options, Mapping) and options.get("minTimeout") not in (None, ""):
        try:
            min_timeout = max(0.0, float(options["minTimeout"]))
        except (TypeError, ValueError):
            raise argument("options[minTimeout] must be a number") from None
    if any(b.event == event and b.handler == handler for b in portal.online):
        raise _already()
    auth_type = params.integer(p.get("AUTH_TYPE"), "auth_type", 0)
    binding = OnlineBinding(portal.new_binding_id(), event, handler, auth_type, min_timeout)
    portal.online.append(binding)
    return Outcome(True)


def event_get(call: Call) -> Outcome:
    portal = call.portal
    offline = [
        {"event": event, "connector_id": connector, "offline": 1}
        for event, connector in sorted(portal.offline)
    ]
    online = [
        {"event": b.event, "handler": b.handler, "auth_type": str(b.auth_type), "offline": 0}
        for b in portal.online
    ]
    return Outcome(online + offline)


def event_unbind(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    event = params.required(call, "EVENT").upper()
    if params.text(p.get("EVENT_TYPE")).lower() == "offline":
        key = (event, call.connector)
        count = int(key in portal.offline)
        portal.offline.discard(key)
        return Outcome({"count": count})
    handler = params.text(p.get("HANDLER"))
    keep = [b for b in portal.online if b.event != event or (handler and b.handler != handler)]
    count = len(portal.online) - len(keep)
    portal.online[:] = keep
    return Outcome({"count": count})


def feature_get(call: Call) -> Outcome:
    code = params.required(call, "CODE")
    config = call.portal.config
    enabled = {
        "rest_offline_extended": config.offline_extended,
        "rest_auth_connector": config.auth_connector_feature,
    }.get(code, False)
    return Outcome({"value": "Y" if enabled else "N"})


def app_info(call: Call) -> Outcome:
    config = call.portal.config
    return Outcome(
        {
            "ID": 1,
            "CODE": config.client_id,
            "VERSION": APP_VERSION,
            "STATUS": "L",
            "INSTALLED": True,
            "PAYMENT_EXPIRED": "N",
            "DAYS": None,
            "LANGUAGE_ID": "en",
            "LICENSE": "en_project",
            "LICENSE_FAMILY": "project",
        }
    )


def user_admin(call: Call) -> Outcome:
    return Outcome(call.portal.is_admin(call.user_id))


METHODS: dict[str, Method] = {
    "event.offline.get": Method(offline.offline_get, admin=True),
    "event.offline.clear": Method(offline.offline_clear, admin=True),
    "event.offline.error": Method(offline.offline_error, admin=True),
    "event.offline.list": Method(offline.offline_list, admin=True),
    "event.bind": Method(event_bind, admin=True),
    "event.get": Method(event_get, admin=True),
    "event.unbind": Method(event_unbind, admin=True),
    "feature.get": Method(feature_get),
    "app.info": Method(app_info),
    "user.admin": Method(user_admin),
    "batch": Method(batch.run),
}
