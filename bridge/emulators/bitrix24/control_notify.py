"""Control routes that make the portal send a notification: ONOFFLINEEVENT, install, uninstall."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.emulators.bitrix24 import notices
from bridge.emulators.bitrix24.control import BadRequest, error, json_body, portal_of
from bridge.emulators.bitrix24.portal import Portal


async def deliver(portal: Portal, url: str | None, form: dict[str, Any]) -> JSONResponse:
    if not url:
        return error("no handler URL: bind one or start the emulator with a handler", 409)
    status = await portal.notifier.send(url, form)
    return JSONResponse({"url": url, "status": status})


async def notify(request: Request) -> JSONResponse:
    portal = portal_of(request)
    target = portal.handler_for("ONOFFLINEEVENT")
    if target is None:
        return await deliver(portal, None, {})
    return await deliver(portal, target.url, notices.offline(portal, target.handler_id, None))


async def install(request: Request) -> JSONResponse:
    portal = portal_of(request)
    try:
        body = await json_body(request)
        user_id = int(body.get("user_id", 1))
    except (BadRequest, TypeError, ValueError) as exc:
        return error(str(exc))
    url = body.get("url") or portal.config.handler_url
    if not url:
        return error(NO_INSTALL_URL, 409)
    return await deliver(portal, url, install_form(portal, user_id))


NO_INSTALL_URL = "no install URL: start the emulator with a handler or pass 'url'"


def install_form(portal: Portal, user_id: int) -> dict[str, Any]:
    """Install the application afresh; the ONAPPINSTALL notification to send for it."""
    portal.install()
    handler_id = portal.implicit_binding("ONAPPINSTALL")  # the install URL's binding
    return notices.install(portal, handler_id, user_id)


async def uninstall(request: Request) -> JSONResponse:
    portal = portal_of(request)
    try:
        body = await json_body(request)
    except BadRequest as exc:
        return error(str(exc))
    target = portal.handler_for("ONAPPUNINSTALL")
    url = body.get("url") or (target.url if target else None)
    clean = bool(body.get("clean", False))
    handler_id = target.handler_id if target else portal.implicit_binding("ONAPPUNINSTALL")
    form = notices.uninstall(portal, handler_id, clean)
    portal.uninstall(clean)
    return await deliver(portal, url, form)


routes = [
    Route("/notify", notify, methods=["POST"]),
    Route("/install", install, methods=["POST"]),
    Route("/uninstall", uninstall, methods=["POST"]),
]
