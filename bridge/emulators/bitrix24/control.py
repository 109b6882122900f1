"""The control API under ``/_emulator/``: what a test or a consumer team uses to play the portal.

Every route answers JSON; a body it cannot use is a ``400`` with ``{"error": ...}`` and changes
nothing. The README lists the routes and the shape of ``/faults``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.emulators.bitrix24.phpjson import php_value
from bridge.emulators.bitrix24.portal import Incoming, Portal

MAX_GENERATE = 1_000_000


class BadRequest(Exception):
    pass


PORTAL_KEY = "bridge.emulators.bitrix24.portal"  # the request's portal, found by the app


def portal_of(request: Request) -> Portal:
    portal: Portal = request.scope[PORTAL_KEY]
    return portal


async def json_body(request: Request) -> dict[str, Any]:
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


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def app_info(request: Request) -> JSONResponse:
    portal = portal_of(request)
    config = portal.config
    pair = portal.tokens.issue(min(config.admin_user_ids, default=1), portal.now())
    return JSONResponse(
        {
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "application_token": config.application_token,
            "member_id": config.member_id,
            "domain": portal.domain,
            "client_endpoint": portal.client_endpoint,
            "oauth_url": request.app.state.farm.oauth_url,
            "refresh_token": pair.refresh_token,
        }
    )


def incoming_events(body: dict[str, Any]) -> list[Incoming]:
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
        data = php_value(item.get("data", False))  # as PHP holds it: MESSAGE_ID hashes that
        found.append(Incoming(item["event"], data, int(item.get("user_id", 1))))
    return found


async def add_events(request: Request) -> JSONResponse:
    try:
        body = await json_body(request)
        incoming = incoming_events(body)
    except (BadRequest, TypeError, ValueError) as exc:
        return error(str(exc))
    return JSONResponse(portal_of(request).add_events(incoming, str(body.get("connector") or "")))


async def queue_state(request: Request) -> JSONResponse:
    portal = portal_of(request)
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
    return JSONResponse(dict(portal_of(request).calls))


async def stats(request: Request) -> JSONResponse:
    portal = portal_of(request)
    now = portal.now()
    limiter = portal.operating
    methods = set(portal.calls) | set(limiter.snapshot(now))
    return JSONResponse(
        {
            "calls": dict(portal.calls),
            "errors": dict(portal.errors),
            "notifications": {**portal.notifier.stats, "suppressed": portal.suppressed},
            "bucket": portal.bucket.level,
            "operating": {m: round(limiter.used(m, now), 6) for m in sorted(methods)},
            "operating_limit": limiter.limit,
            "bans": {m: until for m in sorted(methods) if (until := limiter.banned_until(m, now))},
            "bans_imposed": dict(limiter.bans_imposed),
            "cleaned": portal.cleaned,
            "delivered": portal.delivered,
            "cleared": portal.cleared,
            "now": now,
        }
    )


async def operating(request: Request) -> JSONResponse:
    """``{"method", "seconds"}`` spends operating time now; ``"ban": S`` bans the method."""
    portal = portal_of(request)
    try:
        body = await json_body(request)
        method = str(body["method"]).strip().lower()
        seconds = float(body.get("seconds", 0))
        ban = None if body.get("ban") is None else float(body["ban"])
        if not method or seconds < 0 or (ban is not None and ban <= 0):
            raise ValueError("method must be named, seconds >= 0 and ban > 0")
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        return error(f"bad operating time: {exc!r}")
    now = portal.now()
    if seconds:
        portal.operating.spend(method, seconds, now)
    if ban is not None:
        portal.operating.bans[method] = now + ban
    return JSONResponse(
        {
            "method": method,
            "operating": round(portal.operating.used(method, now), 6),
            "banned_until": portal.operating.banned_until(method, now),
            "limit": portal.operating.limit,
        }
    )


async def cleanup(request: Request) -> JSONResponse:
    """Run the queue's cleanup agent now, at the portal's clock."""
    portal = portal_of(request)
    now = portal.now()
    return JSONResponse({"deleted": portal.clean(now), "now": now})


async def faults(request: Request) -> JSONResponse:
    portal = portal_of(request)
    try:
        body = await json_body(request)
        # Checked on a copy first: a body with one bad part changes nothing.
        trial = copy.deepcopy(portal.faults)
        trial.apply(body)
    except (BadRequest, KeyError, TypeError, ValueError) as exc:
        return error(f"bad faults: {exc!r}")
    portal.faults = trial
    if body.get("expire_tokens"):
        portal.tokens.expire_all(portal.now())
    return JSONResponse(portal.faults.view())


async def reset(request: Request) -> JSONResponse:
    portal_of(request).reset()
    return JSONResponse({"reset": True})


async def clock(request: Request) -> JSONResponse:
    portal = portal_of(request)
    try:
        portal.time_shift += float((await json_body(request)).get("advance", 0))
    except (BadRequest, TypeError, ValueError) as exc:
        return error(str(exc))
    return JSONResponse({"now": portal.now()})


routes = [
    Route("/app", app_info, methods=["GET"]),
    Route("/events", add_events, methods=["POST"]),
    Route("/queue", queue_state, methods=["GET"]),
    Route("/calls", calls, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/faults", faults, methods=["POST"]),
    Route("/reset", reset, methods=["POST"]),
    Route("/clock", clock, methods=["POST"]),
    Route("/operating", operating, methods=["POST"]),
    Route("/cleanup", cleanup, methods=["POST"]),
]
