"""The control API under ``/_emulator/``: what a test or a consumer team uses to play the portal."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.emulator.errors import STATUS
from bridge.emulator.portal import Incoming, Portal

MAX_GENERATE = 1_000_000


class BadRequest(Exception):
    pass


def _portal(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


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


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def app_info(request: Request) -> JSONResponse:
    portal = _portal(request)
    config = portal.config
    pair = portal.tokens.issue(min(config.admin_user_ids, default=1), portal.now())
    return JSONResponse(
        {
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "application_token": config.application_token,
            "member_id": config.member_id,
            "domain": config.domain,
            "client_endpoint": config.client_endpoint,
            "oauth_url": config.base_url,
            "refresh_token": pair.refresh_token,
        }
    )


def _incoming(body: dict[str, Any]) -> list[Incoming]:
    generate = body.get("generate")
    if isinstance(generate, Mapping):
        event, count = str(generate.get("event", "ONCRMLEADADD")), int(generate.get("count", 1))
        start = int(generate.get("start_id", 1))
        if not 0 <= count <= MAX_GENERATE:
            raise BadRequest(f"count must be within 0..{MAX_GENERATE}")
        user = int(generate.get("user_id", 1))
        return [
            Incoming(event, {"FIELDS": {"ID": str(i)}}, user) for i in range(start, start + count)
        ]
    events = body.get("events")
    if not isinstance(events, list):
        raise BadRequest("'events' (a list) or 'generate' (an object) is required")
    found = []
    for item in events:
        if not isinstance(item, Mapping) or not isinstance(item.get("event"), str):
            raise BadRequest("each event needs an 'event' name")
        found.append(Incoming(item["event"], item.get("data", False), int(item.get("user_id", 1))))
    return found


async def add_events(request: Request) -> JSONResponse:
    try:
        body = await _json(request)
        incoming = _incoming(body)
    except (BadRequest, TypeError, ValueError) as exc:
        return _error(str(exc))
    return JSONResponse(_portal(request).add_events(incoming, str(body.get("connector") or "")))


async def queue_state(request: Request) -> JSONResponse:
    portal = _portal(request)
    queue = portal.store.queue(request.query_params.get("connector", ""))
    answer: dict[str, Any] = {
        "free": queue.free_count,
        "reserved": queue.reserved_counts(),
        "errors": queue.error_count,
    }
    if request.query_params.get("detail") in ("1", "true", "yes"):
        answer["rows"] = [row.as_listed(portal.store.zone) for row in queue.rows.values()]
    return JSONResponse(answer)


async def calls(request: Request) -> JSONResponse:
    return JSONResponse(dict(_portal(request).calls))


async def stats(request: Request) -> JSONResponse:
    portal = _portal(request)
    now = portal.now()
    return JSONResponse(
        {
            "calls": dict(portal.calls),
            "errors": dict(portal.errors),
            "notifications": {**portal.notifier.stats, "suppressed": portal.suppressed},
            "bucket": portal.bucket.level,
            "operating": {m: portal.operating.used(m, now) for m in portal.calls},
            "now": now,
        }
    )


async def _deliver(portal: Portal, url: str | None, form: dict[str, Any]) -> JSONResponse:
    if not url:
        return _error("no handler URL: bind one or start the emulator with a handler", 409)
    status = await portal.notifier.send(url, form)
    return JSONResponse({"url": url, "status": status})


async def notify(request: Request) -> JSONResponse:
    portal = _portal(request)
    target = portal.handler_for("ONOFFLINEEVENT")
    return await _deliver(portal, target and target[0], portal.offline_notice(None))


async def install(request: Request) -> JSONResponse:
    portal = _portal(request)
    try:
        body = await _json(request)
    except BadRequest as exc:
        return _error(str(exc))
    url = body.get("url") or portal.config.handler_url
    if not url:
        return _error("no install URL: start the emulator with a handler or pass 'url'", 409)
    portal.install()
    return await _deliver(portal, url, portal.install_notice(int(body.get("user_id", 1))))


async def uninstall(request: Request) -> JSONResponse:
    portal = _portal(request)
    try:
        body = await _json(request)
    except BadRequest as exc:
        return _error(str(exc))
    target = portal.handler_for("ONAPPUNINSTALL")
    url = body.get("url") or (target and target[0])
    clean = bool(body.get("clean", False))
    form = portal.uninstall_notice(clean)
    portal.uninstall(clean)
    return await _deliver(portal, url, form)


def _apply_faults(portal: Portal, body: dict[str, Any]) -> None:
    faults = portal.faults
    if "latency_ms" in body:
        faults.latency_ms = max(0.0, float(body["latency_ms"]))
    for method, count in dict(body.get("fail") or {}).items():
        faults.fail[str(method).lower()] = int(count)
    for method, spec in dict(body.get("fail_with") or {}).items():
        code = str(spec["error"])
        faults.fail_with[str(method).lower()] = (code, int(spec.get("count", 1)))
    if "drop_next_reservation" in body:
        faults.drop_next_reservation = bool(body["drop_next_reservation"])
    if body.get("expire_tokens"):
        portal.tokens.expire_all(portal.now())


async def faults(request: Request) -> JSONResponse:
    portal = _portal(request)
    try:
        _apply_faults(portal, await _json(request))
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        return _error(f"bad faults: {exc!r}")
    state = portal.faults
    return JSONResponse(
        {
            "latency_ms": state.latency_ms,
            "fail": state.fail,
            "fail_with": {m: {"error": c, "count": n} for m, (c, n) in state.fail_with.items()},
            "drop_next_reservation": state.drop_next_reservation,
            "known_errors": sorted(STATUS),
        }
    )


async def reset(request: Request) -> JSONResponse:
    _portal(request).reset()
    return JSONResponse({"reset": True})


async def clock(request: Request) -> JSONResponse:
    portal = _portal(request)
    try:
        portal.time_shift += float((await _json(request)).get("advance", 0))
    except (BadRequest, TypeError, ValueError) as exc:
        return _error(str(exc))
    return JSONResponse({"now": portal.now()})


routes = [
    Route("/app", app_info, methods=["GET"]),
    Route("/events", add_events, methods=["POST"]),
    Route("/queue", queue_state, methods=["GET"]),
    Route("/calls", calls, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/notify", notify, methods=["POST"]),
    Route("/install", install, methods=["POST"]),
    Route("/uninstall", uninstall, methods=["POST"]),
    Route("/faults", faults, methods=["POST"]),
    Route("/reset", reset, methods=["POST"]),
    Route("/clock", clock, methods=["POST"]),
]
