"""The Diadoc emulator as an ASGI app: ``/V{3,4,5}/GetDocflowEvents``, ``/connect/token`` and
the control API under ``/_emulator/`` (JSON in and out, the same style as the Bitrix24
emulator's). Like Kontur's API it answers protobuf unless asked ``Accept: application/json``.

- ``GET /_emulator/app``: credentials, a fresh refresh token, URLs and boxes
- ``POST /_emulator/boxes`` ``{"box", "department"?}``: adds a box; with ``department`` the
  account sees only that department of it (other requests get 403)
- ``POST /_emulator/events`` ``{"box", "count", "document_type", "documents", "age_s", "tied",
  "department", "defect"}``: adds events; ``documents`` > 1 gives one change of a message,
  several documents, one EventId; ``age_s`` files them late; ``tied`` gives them one IndexKey;
  ``defect`` (``no_event_id``, ``bad_timestamp``, ``no_index_key``, ``not_an_object``) breaks
  them
- ``POST /_emulator/late`` ``{"box", "age_s"}``: one event with a timestamp in the past
- ``POST /_emulator/duplicate`` ``{"box", "key"?}``: delivers an event (the newest) again
- ``GET /_emulator/events?box=``: the box's events in IndexKey order
- ``POST /_emulator/faults`` ``{"rules": [...], "expire_tokens", "latency_ms", "sunset",
  "deprecation"}``: injects faults (a rule: ``{"status", "count", "after", "error_code",
  "retry_after", "expire_tokens"}``); ``sunset``/``deprecation`` map a version number to the
  header value its answers carry
- ``GET /_emulator/counters`` · ``GET /_emulator/requests``: what was asked and answered
- ``POST /_emulator/reset``: events, counters and faults cleared
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from bridge.emulators.diadoc.events import HEAD_DEPARTMENT
from bridge.emulators.diadoc.faults import Answer, FaultRule
from bridge.emulators.diadoc.model import DiadocEmulator


class BadRequest(Exception):
    pass


def _model(request: Request) -> DiadocEmulator:
    model: DiadocEmulator = request.app.state.diadoc
    return model


def _reply(answer: Answer) -> Response:
    if answer.raw is not None:
        return Response(
            answer.raw,
            status_code=answer.status,
            headers=dict(answer.headers),
            media_type=answer.media_type,
        )
    return JSONResponse(answer.body, status_code=answer.status, headers=dict(answer.headers))


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


# -- the API ---------------------------------------------------------------------------------


async def docflow_events(request: Request) -> Response:
    model = _model(request)
    if model.latency_ms > 0:
        await asyncio.sleep(model.latency_ms / 1000)
    try:
        raw = await request.body()
    except ClientDisconnect:
        return Response(status_code=499)  # the client hung up (a killed bridge); nobody reads it
    try:
        body: Any = json.loads(raw or b"null")
    except ValueError:
        body = None
    answer = model.docflow_events(
        request.query_params.get("boxId"),
        request.headers.get("authorization", ""),
        body,
        version=int(request.path_params["version"]),
        accept=request.headers.get("accept", ""),
        content_type=request.headers.get("content-type", ""),
    )
    return _reply(answer)


async def token(request: Request) -> Response:
    try:
        raw = await request.body()
    except ClientDisconnect:
        return Response(status_code=499)
    form = dict(parse_qsl(raw.decode(errors="replace")))
    return _reply(_model(request).token(form))


# -- control -----------------------------------------------------------------------------------


async def app_info(request: Request) -> JSONResponse:
    model = _model(request)
    base = str(request.base_url).rstrip("/")
    return JSONResponse(
        {
            "client_id": model.client_id,
            "client_secret": model.client_secret,
            "refresh_token": model.issue_refresh_token(),
            "api_url": base,
            "token_url": f"{base}/connect/token",
            "boxes": model.boxes,
        }
    )


async def add_box(request: Request) -> JSONResponse:
    try:
        body = await _json(request)
        box = str(body["box"])
    except (BadRequest, KeyError) as exc:
        return _bad(f"'box' is required: {exc}")
    department = body.get("department")
    _model(request).add_box(box, department=None if department is None else str(department))
    return JSONResponse({"boxes": _model(request).boxes})


async def add_events(request: Request) -> JSONResponse:
    try:
        body = await _json(request)
        added = _model(request).add_events(
            str(body["box"]),
            count=int(body.get("count", 1)),
            document_type=str(body.get("document_type", "UniversalTransferDocument")),
            documents=max(1, int(body.get("documents", 1))),
            age_s=float(body.get("age_s", 0)),
            tied=bool(body.get("tied", False)),
            department=str(body.get("department", HEAD_DEPARTMENT)),
            defect=None if body.get("defect") is None else str(body["defect"]),
        )
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        return _bad(f"bad events request: {exc!r}")
    return JSONResponse({"added": [e.summary() for e in added]})


async def late(request: Request) -> JSONResponse:
    try:
        body = await _json(request)
        added = _model(request).add_events(
            str(body["box"]),
            document_type=str(body.get("document_type", "UniversalTransferDocument")),
            age_s=float(body.get("age_s", 600)),
        )
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        return _bad(f"bad late-event request: {exc!r}")
    return JSONResponse({"added": [e.summary() for e in added]})


async def duplicate(request: Request) -> JSONResponse:
    try:
        body = await _json(request)
        key = body.get("key")
        event = _model(request).duplicate(str(body["box"]), None if key is None else str(key))
    except (BadRequest, KeyError, StopIteration) as exc:
        return _bad(f"bad duplicate request: {exc!r}")
    return JSONResponse({"added": [event.summary()]})


async def list_events(request: Request) -> JSONResponse:
    try:
        events = _model(request).events(request.query_params.get("box", ""))
    except KeyError:
        return _bad("unknown box")
    return JSONResponse({"events": [e.summary() for e in events]})


async def faults(request: Request) -> JSONResponse:
    model = _model(request)
    try:
        body = await _json(request)
        rules = [FaultRule.from_json(r) for r in body.get("rules") or []]
        if "latency_ms" in body:
            model.latency_ms = max(0.0, float(body["latency_ms"]))
        for name in ("sunset", "deprecation"):
            notices = {int(v): str(text) for v, text in (body.get(name) or {}).items()}
            getattr(model, name).update(notices)
    except (BadRequest, AttributeError, TypeError, ValueError) as exc:
        return _bad(f"bad faults: {exc!r}")
    model.add_faults(rules)
    if body.get("expire_tokens"):
        model.expire_tokens()
    return JSONResponse({"pending_rules": len(model.rules), "latency_ms": model.latency_ms})


async def counters(request: Request) -> JSONResponse:
    return JSONResponse(_model(request).counters())


async def requests(request: Request) -> JSONResponse:
    return JSONResponse({"requests": list(_model(request).requests)})


async def reset(request: Request) -> JSONResponse:
    _model(request).reset()
    return JSONResponse({"reset": True})


control_routes = [
    Route("/app", app_info, methods=["GET"]),
    Route("/boxes", add_box, methods=["POST"]),
    Route("/events", add_events, methods=["POST"]),
    Route("/events", list_events, methods=["GET"]),
    Route("/late", late, methods=["POST"]),
    Route("/duplicate", duplicate, methods=["POST"]),
    Route("/faults", faults, methods=["POST"]),
    Route("/counters", counters, methods=["GET"]),
    Route("/requests", requests, methods=["GET"]),
    Route("/reset", reset, methods=["POST"]),
]


def create_diadoc_app(model: DiadocEmulator) -> Starlette:
    """The emulator's ASGI app; ``app.state.diadoc`` is its :class:`DiadocEmulator`."""
    app = Starlette(
        routes=[
            Route("/V{version:int}/GetDocflowEvents", docflow_events, methods=["POST"]),
            Route("/connect/token", token, methods=["POST"]),
            Mount("/_emulator", routes=control_routes),
        ]
    )
    app.state.diadoc = model
    return app
