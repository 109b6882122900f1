"""The emulator as an ASGI application: ``/rest/``, ``/oauth/token/`` and ``/_emulator/``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from bridge.emulators.bitrix24 import calllog, control, control_notify, farm_control
from bridge.emulators.bitrix24.calls import handle, method_name
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.control import PORTAL_KEY, portal_of
from bridge.emulators.bitrix24.errors import RestError, argument
from bridge.emulators.bitrix24.farm import Farm, FarmOAuthError
from bridge.emulators.bitrix24.oauth import OAuthError
from bridge.emulators.bitrix24.phpform import parse_str
from bridge.emulators.bitrix24.portal import Portal

DROP_KEY = "bridge.emulators.bitrix24.drop"
FARM_WIDE = ("/oauth/", "/_farm/")  # answered on any address; the rest is a portal's
MAX_BODY = 8 * 1024 * 1024


class _Dropped:
    """Returned to the ASGI server so uvicorn closes the connection without any answer."""

    def __repr__(self) -> str:
        return "<emulator: answer dropped on purpose>"


DROPPED = _Dropped()


class _HideDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.args, tuple) and DROPPED in record.args)


_HIDE_DROPS = _HideDrops()


class EmulatorApp(Starlette):
    """Starlette that finds the portal a request is for, and can lose an answer: the
    lost-reservation fault needs a silent hang-up."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return None
        farm: Farm = self.state.farm
        portal = farm.portal_at(Headers(scope=scope).get("host", ""), scope.get("server"))
        if portal is None and not scope["path"].startswith(FARM_WIDE):
            await JSONResponse({"error": "no portal at this address"}, 404)(scope, receive, send)
            return None
        scope[PORTAL_KEY] = portal
        marker: dict[str, bool] = {"dropped": False}
        scope[DROP_KEY] = marker
        await super().__call__(scope, receive, send)
        # uvicorn closes the connection, sending nothing, when an app returns a value.
        return DROPPED if marker["dropped"] else None


class DroppedAnswer(Response):
    """The server acted, but the client hears nothing back."""

    def __init__(self) -> None:
        super().__init__(b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502)
        self.headers["content-type"] = "text/html"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        marker = scope.get(DROP_KEY)
        if isinstance(marker, dict):
            marker["dropped"] = True
            return
        # Under a server other than uvicorn: the closest thing, a proxy's non-JSON error page.
        await super().__call__(scope, receive, send)


async def _params(request: Request) -> dict[str, Any]:
    found: dict[str, Any] = parse_str(request.url.query) if request.url.query else {}
    body = await request.body()
    if len(body) > MAX_BODY:
        raise argument("Request body is too large")
    if not body.strip():
        return found
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        try:
            decoded = json.loads(body)
        except ValueError:
            raise argument("Request body is not valid JSON") from None
        if not isinstance(decoded, dict):
            raise argument("Request body must be a JSON object")
    else:
        decoded = parse_str(body)
    return {**found, **decoded}


async def _request_params(request: Request) -> dict[str, Any]:
    try:
        return await _params(request)
    except ValueError as exc:  # a hostile query string or form body
        raise argument(f"Malformed request: {exc}") from exc


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _moved(portal: Portal, request: Request) -> Response | None:
    """After a domain change the old address answers 302 to the same path on the new one."""
    moved_to = portal.faults.moved_to
    if moved_to is None or request.url.netloc == portal.domain:
        return None
    location = f"{moved_to}{request.url.path}" + (
        f"?{request.url.query}" if request.url.query else ""
    )
    return Response(status_code=302, headers={"location": location})


def _log(
    request: Request,
    kind: str,
    portal: Portal | None,
    method: str,
    answer: Response,
    arrived: tuple[float, float],
    commands: tuple[str, ...] | None = None,
) -> None:
    farm: Farm = request.app.state.farm
    error = None
    if answer.status_code >= 400 and isinstance(answer, JSONResponse):
        error = json.loads(bytes(answer.body)).get("error")
    outcome = "moved" if answer.status_code == 302 else error or "ok"
    if isinstance(answer, DroppedAnswer):
        outcome = "dropped"
    farm.call_log.record(
        kind=kind,
        member_id=portal.config.member_id if portal is not None else None,
        method=method,
        headers=request.headers,
        outcome=str(outcome),
        status=answer.status_code,
        arrived=arrived,
        commands=commands,
    )


async def rest(request: Request) -> Response:
    arrived = calllog.now()
    portal = portal_of(request)
    path = request.path_params["path"]
    answer, commands = await _rest(portal, request, path)
    method = method_name(path.rstrip("/").rpartition("/")[2])
    _log(request, "rest", portal, method, answer, arrived, commands)
    return answer


async def _rest(
    portal: Portal, request: Request, path: str
) -> tuple[Response, tuple[str, ...] | None]:
    """The answer, and a batch's command methods for the call log."""
    moved = _moved(portal, request)
    if moved is not None:
        return moved, None
    latency = portal.faults.latency_ms
    latency = portal.config.latency_ms if latency is None else latency
    if latency > 0:
        await asyncio.sleep(latency / 1000)
    try:
        params = await _request_params(request)
    except RestError as exc:
        return JSONResponse(exc.body(), status_code=exc.status), None
    handled = handle(portal, path, params, _bearer(request))
    if handled.dropped:
        return DroppedAnswer(), handled.commands
    reply = handled.reply
    return JSONResponse(reply.body(), status_code=reply.status), handled.commands


async def token(request: Request) -> Response:
    arrived = calllog.now()
    farm: Farm = request.app.state.farm
    params = dict(request.query_params)
    owner: Portal | None = None
    if request.method == "POST":
        try:
            params.update(parse_str(await request.body()))
        except ValueError:
            farm.unattributed["invalid_request"] += 1
            answer = JSONResponse(OAuthError("invalid_request", "bad body", 400).body(), 400)
            _log(request, "oauth", None, "oauth.token", answer, arrived)
            return answer
    try:
        owner, body = farm.refresh(params)
        answer = JSONResponse(body)
    except FarmOAuthError as exc:
        owner, answer = exc.portal, JSONResponse(exc.body(), status_code=exc.status)
    _log(request, "oauth", owner, "oauth.token", answer, arrived)
    return answer


def create_emulator_app(
    config: EmulatorConfig, *, portal: Portal | None = None, farm: Farm | None = None
) -> Starlette:
    """The emulator's ASGI app for one portal (``portal``, else a new one of ``config``) or for
    every portal of ``farm``; ``app.state.portal`` is the first, ``app.state.farm`` all."""
    if farm is None:
        farm = Farm([portal if portal is not None else Portal(config)])
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _HIDE_DROPS not in uvicorn_log.filters:
        uvicorn_log.addFilter(_HIDE_DROPS)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.gather(*(p.notifier.aclose() for p in farm.portals))
        farm.close()

    app = EmulatorApp(
        routes=[
            Route("/rest/{path:path}", rest, methods=["GET", "POST"]),
            Route("/oauth/token/", token, methods=["GET", "POST"]),
            Route("/oauth/token", token, methods=["GET", "POST"]),
            Mount("/_emulator", routes=[*control.routes, *control_notify.routes]),
            Mount("/_farm", routes=farm_control.routes),
        ],
        lifespan=lifespan,
    )
    app.state.portal = farm.portals[0]
    app.state.farm = farm
    return app
