"""The one-shot commands that need the portals but not the broker: ``status`` and ``bind``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from bridge.binding import bind_portal
from bridge.bootstrap import bootstrap
from bridge.diadoc.settings import DiadocSettings
from bridge.diadoc.wiring import diadoc_status
from bridge.errors import BridgeError, ConfigError
from bridge.metrics import Metrics
from bridge.oauth import OAuthClient
from bridge.settings import Settings
from bridge.state import State
from bridge.upstream import PortalClient


@asynccontextmanager
async def _clients(settings: Settings) -> AsyncIterator[tuple[State, list[PortalClient]]]:
    state = await State.open(settings.state_path, settings.state_keys)
    http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0), follow_redirects=False)
    try:
        clients: list[PortalClient] = []
        if settings.portal_url or await state.portals():
            client_id, secret = settings.require_credentials()
            oauth = OAuthClient(
                http, oauth_url=settings.oauth_url, client_id=client_id, client_secret=secret
            )
            await bootstrap(settings, state, oauth)
            metrics = Metrics()
            clients = [
                PortalClient(
                    p,
                    http=http,
                    oauth=oauth,
                    save=state.save_portal,
                    metrics=metrics,
                    rate_limit=settings.rate_limit,
                    rate_burst=settings.rate_burst,
                )
                for p in await state.portals()
            ]
        yield state, clients
    finally:
        await http.aclose()
        await state.close()


async def portal_status(
    settings: Settings, *, ask_upstream: bool, diadoc: DiadocSettings | None = None
) -> dict[str, Any]:
    state = await State.open(settings.state_path, settings.state_keys)
    try:
        portals = await state.portals(include_inactive=True)
        journal = await state.journal_all()
        boxes = await diadoc_status(diadoc, state) if diadoc is not None and diadoc.enabled else []
    finally:
        await state.close()
    out: list[dict[str, Any]] = []
    for p in portals:
        out.append(
            {
                "domain": p.domain,
                "member_id": p.member_id,
                "status": p.status,
                "refresh_token": bool(p.refresh_token),
                "access_token_expires_at": p.expires_at or None,
                "in_flight": [pid for m, _c, pid in journal if m == p.member_id],
                "queue_depth": None,
            }
        )
    if ask_upstream and any(p.active for p in portals):
        try:
            async with _clients(settings) as (_state, clients):
                for client in clients:
                    entry = next(e for e in out if e["member_id"] == client.portal.member_id)
                    try:
                        answer = await client.call(
                            "event.offline.list",
                            {"auth_connector": settings.auth_connector}
                            if settings.auth_connector
                            else {},
                            idempotent=True,
                        )
                        entry["queue_depth"] = answer.total
                    except BridgeError as exc:
                        entry["upstream_error"] = str(exc)
        except ConfigError as exc:
            for entry in out:
                entry["upstream_error"] = str(exc)
    return {"portals": out, "diadoc_boxes": boxes}


async def bind_all(settings: Settings) -> dict[str, list[str]]:
    if not settings.events and not settings.public_url:
        raise ConfigError("nothing to bind: set BRIDGE_EVENTS and/or BRIDGE_PUBLIC_URL")
    results: dict[str, list[str]] = {}
    async with _clients(settings) as (_state, clients):
        if not clients:
            raise ConfigError("no portal known: install the application or set BRIDGE_PORTAL_URL")
        for client in clients:
            results[client.portal.domain] = await bind_portal(client, settings)
    return results
