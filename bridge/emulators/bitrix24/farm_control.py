"""The farm's control API under ``/_farm/``, on any portal's address: every portal at once.

A portal's own ``/_emulator/`` routes stay at its own address. ``portal`` in a body or a query
names one portal by member_id or number (1 is the first); without it a route acts on all.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.emulators.bitrix24.control import BadRequest, error, incoming_events, json_body
from bridge.emulators.bitrix24.control_notify import NO_INSTALL_URL, install_form
from bridge.emulators.bitrix24.farm import Farm
from bridge.emulators.bitrix24.portal import Portal

# Error codes a benchmark counts: the rate limit and the operating-time limit.
RATE_LIMITED = ("QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT")
TIME_LIMITED = ("OPERATION_TIME_LIMIT",)


def _farm(request: Request) -> Farm:
    farm: Farm = request.app.state.farm
    return farm


def _chosen(farm: Farm, key: object) -> list[Portal]:
    if key is None or key == "":
        return farm.portals
    found = farm.find(str(key))
    if found is None:
        raise BadRequest(f"no portal {key!r}: name one by member_id or number")
    return [found]


def _describe(portal: Portal, number: int) -> dict[str, Any]:
    config = portal.config
    return {
        "number": number,
        "member_id": config.member_id,
        "domain": portal.domain,
        "base_url": portal.base_url,
        "client_endpoint": portal.client_endpoint,
        "application_token": config.application_token,
    }


async def portals(request: Request) -> JSONResponse:
    farm = _farm(request)
    config = farm.portals[0].config
    return JSONResponse(
        {
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "oauth_url": farm.oauth_url,
            "portals": [_describe(p, n) for n, p in enumerate(farm.portals, 1)],
        }
    )


async def install(request: Request) -> JSONResponse:
    """Each portal installs the application: ONAPPINSTALL to ``url`` (else its handler)."""
    farm = _farm(request)
    try:
        body = await json_body(request)
        user_id = int(body.get("user_id", 1))
        chosen = _chosen(farm, body.get("portal"))
    except (BadRequest, TypeError, ValueError) as exc:
        return error(str(exc))
    urls = [body.get("url") or portal.config.handler_url for portal in chosen]
    if not all(urls):
        return error(NO_INSTALL_URL, 409)
    sends = [
        p.notifier.send(str(u), install_form(p, user_id)) for p, u in zip(chosen, urls, strict=True)
    ]
    statuses = await asyncio.gather(*sends)
    return JSONResponse(
        {
            "installed": [
                {"member_id": p.config.member_id, "url": url, "status": status}
                for p, url, status in zip(chosen, urls, statuses, strict=True)
            ]
        }
    )


async def add_events(request: Request) -> JSONResponse:
    """The body of ``/_emulator/events``, for one portal or the same events for each."""
    farm = _farm(request)
    try:
        body = await json_body(request)
        chosen = _chosen(farm, body.get("portal"))
        incoming = incoming_events(body)
    except (BadRequest, TypeError, ValueError) as exc:
        return error(str(exc))
    connector = str(body.get("connector") or "")
    return JSONResponse({p.config.member_id: p.add_events(incoming, connector) for p in chosen})


async def queues(request: Request) -> JSONResponse:
    farm = _farm(request)
    try:
        chosen = _chosen(farm, request.query_params.get("portal"))
    except BadRequest as exc:
        return error(str(exc))
    answer = {}
    for portal in chosen:
        queue = portal.store.queue(request.query_params.get("connector", ""))
        answer[portal.config.member_id] = {
            "free": queue.free_count,
            "reserved": sum(queue.reserved_counts().values()),
            "errors": queue.error_count,
            "delivered": portal.delivered,
            "cleared": portal.cleared,
        }
    return JSONResponse(answer)


def _counters(portal: Portal) -> dict[str, Any]:
    errors = portal.errors
    return {
        "calls": sum(portal.calls.values()),
        "errors": dict(errors),
        "invalid_grant": errors["invalid_grant"],
        "rate_limited": sum(errors[code] for code in RATE_LIMITED),
        "time_limited": sum(errors[code] for code in TIME_LIMITED),
        "bans_imposed": sum(portal.operating.bans_imposed.values()),
        "notifications": {**portal.notifier.stats, "suppressed": portal.suppressed},
    }


async def stats(request: Request) -> JSONResponse:
    """Per portal and in total: what a benchmark counts."""
    farm = _farm(request)
    per_portal = {p.config.member_id: _counters(p) for p in farm.portals}
    totals = {
        key: sum(c[key] for c in per_portal.values())
        for key in ("calls", "invalid_grant", "rate_limited", "time_limited", "bans_imposed")
    }
    totals["invalid_grant"] += farm.unattributed["invalid_grant"]
    return JSONResponse(
        {"portals": per_portal, "unattributed": dict(farm.unattributed), "totals": totals}
    )


async def calls(request: Request) -> JSONResponse:
    """The call log from ``since`` (a sequence number; 0 = the start), at most ``limit``."""
    query = request.query_params
    try:
        since, limit = int(query.get("since", 0)), int(query.get("limit", 1000))
    except ValueError:
        return error("since and limit must be integers")
    return JSONResponse(_farm(request).call_log.page(since, limit))


routes = [
    Route("/portals", portals, methods=["GET"]),
    Route("/install", install, methods=["POST"]),
    Route("/events", add_events, methods=["POST"]),
    Route("/queues", queues, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/calls", calls, methods=["GET"]),
]
