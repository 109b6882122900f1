"""The emulator as an ASGI application: ``/rest/``, ``/oauth/token/`` and ``/_emulator/``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from bridge.emulators.bitrix24 import control, control_notify
from bridge.emulators.bitrix24.calls import handle
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.errors import RestError, argument
from bridge.emulators.bitrix24.oauth import OAuthError
from bridge.emulators.bitrix24.phpform import parse_str
from bridge.emulators.bitrix24.portal import Portal

DROP_KEY = "bridge.emulators.bitrix24.drop"
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
    """Starlette that can lose an answer: the lost-reservation fault needs a silent hang-up."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return None
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


async def rest(request: Request) -> Response:
    portal: Portal = request.app.state.portal
    moved = _moved(portal, request)
    if moved is not None:
        return moved
    latency = portal.faults.latency_ms
    latency = portal.config.latency_ms if latency is None else latency
    if latency > 0:
        await asyncio.sleep(latency / 1000)
    try:
        params = await _request_params(request)
    except RestError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    handled = handle(portal, request.path_params["path"], params, _bearer(request))
    if handled.dropped:
        return DroppedAnswer()
    return JSONResponse(handled.reply.body(), status_code=handled.reply.status)


async def token(request: Request) -> Response:
    portal: Portal = request.app.state.portal
    params = dict(request.query_params)
    if request.method == "POST":
        try:
            params.update(parse_str(await request.body()))
        except ValueError:
            return JSONResponse(OAuthError("invalid_request", "bad body", 400).body(), 400)
    try:
        pair = portal.tokens.refresh(params, portal.now())
    except OAuthError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    return JSONResponse(portal.tokens.answer(pair, portal.client_endpoint))


def create_emulator_app(config: EmulatorConfig, *, portal: Portal | None = None) -> Starlette:
    """The emulator's ASGI app; ``app.state.portal`` is its :class:`Portal`."""
    state = portal if portal is not None else Portal(config)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _HIDE_DROPS not in uvicorn_log.filters:
        uvicorn_log.addFilter(_HIDE_DROPS)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await state.notifier.aclose()

    app = EmulatorApp(
        routes=[
            Route("/rest/{path:path}", rest, methods=["GET", "POST"]),
            Route("/oauth/token/", token, methods=["GET", "POST"]),
            Route("/oauth/token", token, methods=["GET", "POST"]),
            Mount("/_emulator", routes=[*control.routes, *control_notify.routes]),
        ],
        lifespan=lifespan,
    )
    app.state.portal = state
    return app
