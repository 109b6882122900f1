"""Offline bindings for ``BRIDGE_EVENTS`` and the ``ONOFFLINEEVENT`` handler on a portal."""

from __future__ import annotations

import logging
from typing import Any

from bridge.bitrix24.upstream import PortalClient
from bridge.core.errors import UpstreamError
from bridge.settings import Settings

log = logging.getLogger(__name__)

HANDLER_PATH = "/bitrix24/events"


def _already_bound(exc: UpstreamError) -> bool:
    return exc.code == "ERROR_CORE" and "already" in exc.description.lower()


async def _bind(client: PortalClient, params: dict[str, Any]) -> bool:
    """Bind once; answers False when the binding already existed."""
    try:
        await client.call("event.bind", params, idempotent=True)
    except UpstreamError as exc:
        if _already_bound(exc):
            return False
        raise
    return True


async def bind_portal(client: PortalClient, settings: Settings) -> list[str]:
    """Make sure the bindings exist; answers the names bound anew."""
    bound: list[str] = []
    for event in settings.events:
        params: dict[str, Any] = {"event": event, "event_type": "offline"}
        if settings.auth_connector:
            params["auth_connector"] = settings.auth_connector
        if await _bind(client, params):
            bound.append(event)
    if settings.public_url:
        handler = settings.public_url.rstrip("/") + HANDLER_PATH
        params = {
            "event": "ONOFFLINEEVENT",
            "handler": handler,
            "options": {"minTimeout": settings.min_timeout},
        }
        if await _bind(client, params):
            bound.append("ONOFFLINEEVENT")
    log.info(
        "bindings checked",
        extra={"portal": client.portal.domain, "events": len(settings.events), "new": len(bound)},
    )
    return bound
