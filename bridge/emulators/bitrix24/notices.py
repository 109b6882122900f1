"""The bodies of the notifications a portal POSTs: ``ONOFFLINEEVENT``, install, uninstall.

Top-level keys follow ``rest/lib/event/sender.php``: ``event``, ``event_handler_id`` (the
binding's ID), ``data``, ``ts``, ``auth``; an empty ``data`` is an empty PHP array, which
``http_build_query`` leaves out of the body. The ``auth`` keys are the ones Bitrix24's event
documentation lists for each event (``b24restdocs``: ``_includes/auth-params-in-events.md``,
``api-reference/events/on-offline-event.md``, ``api-reference/common/events/on-app-install.md``,
``on-app-uninstall.md``). When a user's action caused the event, the user's tokens come too, with
``expires`` and ``user_id``: the documentation leaves these two out, but portals send them (real
captures of install notifications show both) and Bitrix24's Python SDK cannot read a token
without ``expires``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.emulators.bitrix24.config import APP_VERSION

if TYPE_CHECKING:
    from bridge.emulators.bitrix24.portal import Portal

STATUS_LOCAL = "L"  # a local application


def _portal_auth(portal: Portal, *, scope_and_status: bool = True) -> dict[str, Any]:
    config = portal.config
    auth: dict[str, Any] = {}
    if scope_and_status:
        auth["scope"] = config.scope
    auth["domain"] = portal.domain
    auth["server_endpoint"] = config.server_endpoint
    if scope_and_status:
        auth["status"] = STATUS_LOCAL
    auth["client_endpoint"] = portal.client_endpoint
    auth["member_id"] = config.member_id
    return auth


def _user_auth(portal: Portal, user_id: int) -> dict[str, Any]:
    """A fresh token pair of the user whose action caused the event (an OAuth server answer)."""
    config = portal.config
    pair = portal.tokens.issue(user_id, portal.now())
    return {
        "access_token": pair.access_token,
        "expires": pair.expires,
        "expires_in": int(config.token_ttl),
        **_portal_auth(portal),
        "user_id": pair.user_id,
        "refresh_token": pair.refresh_token,
    }


def _notice(
    portal: Portal, event: str, handler_id: int, data: Any, auth: dict[str, Any]
) -> dict[str, Any]:
    auth["application_token"] = portal.config.application_token
    return {
        "event": event,
        "event_handler_id": handler_id,
        "data": data,
        "ts": int(portal.now()),
        "auth": auth,
    }


def offline(portal: Portal, handler_id: int, user_id: int | None) -> dict[str, Any]:
    """``ONOFFLINEEVENT``: no data; the tokens of the user who caused it, if one did."""
    auth = _portal_auth(portal) if user_id is None else _user_auth(portal, user_id)
    return _notice(portal, "ONOFFLINEEVENT", handler_id, [], auth)


def install(portal: Portal, handler_id: int, user_id: int) -> dict[str, Any]:
    data = {"VERSION": APP_VERSION, "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}
    return _notice(portal, "ONAPPINSTALL", handler_id, data, _user_auth(portal, user_id))


def uninstall(portal: Portal, handler_id: int, clean: bool) -> dict[str, Any]:
    """``ONAPPUNINSTALL`` is sent without tokens (``sendAuth`` is off for it)."""
    data = {"LANGUAGE_ID": "en", "CLEAN": int(clean)}
    auth = _portal_auth(portal, scope_and_status=False)
    return _notice(portal, "ONAPPUNINSTALL", handler_id, data, auth)
