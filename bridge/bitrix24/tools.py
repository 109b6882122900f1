"""The one-shot commands that need the portals but not the broker: ``status``, ``bind``,
``parked``.

``status`` and ``parked`` only read: they never refresh a token (refresh tokens rotate, and the
serving process owns them) and take no lock. ``bind`` and ``parked --replay`` may refresh, so
they take the state file's lock, or (``parked --replay``) leave the request to the serving
process that holds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from bridge.bitrix24.binding import bind_portal
from bridge.bitrix24.bootstrap import bootstrap
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.portals import BIND, REPLAY
from bridge.bitrix24.upstream import PortalClient
from bridge.core.errors import BridgeError, ConfigError
from bridge.diadoc.settings import DiadocSettings
from bridge.diadoc.wiring import diadoc_status
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.state.lock import StateLock
from bridge.state.open import StateStore, open_state

PARKED_SHOWN = 500
PARKED_FIELDS = ("ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID", "PROCESS_ID", "EVENT_DATA")


@asynccontextmanager
async def _clients(
    settings: Settings, *, refresh: bool, purpose: str = ""
) -> AsyncIterator[tuple[StateStore, list[PortalClient]]]:
    """Clients of every active portal; with ``refresh``, under the state file's lock."""
    lock = StateLock(settings.state_path)
    if refresh:
        lock.acquire(purpose)
    try:
        state = await open_state(settings)
    except BaseException:
        lock.release()
        raise
    http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0), follow_redirects=False)
    try:
        clients: list[PortalClient] = []
        if (refresh and settings.portal_url) or await state.portals():
            client_id, secret = settings.require_credentials()
            oauth = OAuthClient(
                http, oauth_url=settings.oauth_url, client_id=client_id, client_secret=secret
            )
            if refresh:
                await bootstrap(settings, state, oauth)
            metrics = Metrics()
            clients = [
                PortalClient(
                    p,
                    http=http,
                    oauth=oauth,
                    save=state.save_portal,
                    load=state.portal,
                    metrics=metrics,
                    rate_limit=settings.rate_limit,
                    rate_burst=settings.rate_burst,
                    refresh=refresh,
                )
                for p in await state.portals()
            ]
        yield state, clients
        for client in clients:
            await client.aclose()
    finally:
        await http.aclose()
        await state.close()
        lock.release()


async def portal_status(
    settings: Settings, *, ask_upstream: bool, diadoc: DiadocSettings | None = None
) -> dict[str, Any]:
    state = await open_state(settings)
    try:
        portals = await state.portals(include_inactive=True)
        journal = await state.journal_all()
        health = await state.health()
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
                "stopped": health.get(p.member_id, ("", ""))[0] or None,
                "binding_error": health.get(p.member_id, ("", ""))[1] or None,
            }
        )
    if ask_upstream and any(p.active for p in portals):
        try:
            async with _clients(settings, refresh=False) as (_state, clients):
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
    if settings.state_url is not None:
        return {domain: [] for domain in await _hand_over(settings, BIND)}
    results: dict[str, list[str]] = {}
    async with _clients(settings, refresh=True, purpose="bind") as (state, clients):
        if not clients:
            raise ConfigError("no portal known: install the application or set BRIDGE_PORTAL_URL")
        for client in clients:
            try:
                results[client.portal.domain] = await bind_portal(client, settings)
            except BridgeError as exc:
                await state.set_health(client.portal.member_id, binding_error=str(exc))
                raise
            await state.set_health(client.portal.member_id, binding_error="")
    return results


async def parked_events(settings: Settings) -> dict[str, Any]:
    """Parked events per portal (read-only: ``event.offline.list`` with ``ERROR=1``), and the
    rows only the state file could keep."""
    out: list[dict[str, Any]] = []
    async with _clients(settings, refresh=False) as (state, clients):
        local = await state.parked("bitrix24")
        for client in clients:
            entry: dict[str, Any] = {
                "domain": client.portal.domain,
                "member_id": client.portal.member_id,
                "parked": [],
                "kept_in_state_file": [
                    {"ref": r.ref, "reason": r.reason, "row": r.payload}
                    for r in local
                    if r.key == client.portal.member_id
                ],
            }
            params: dict[str, Any] = {"filter": {"ERROR": 1}, "order": {"ID": "ASC"}}
            if settings.auth_connector:
                params["auth_connector"] = settings.auth_connector
            try:
                start = 0
                while len(entry["parked"]) < PARKED_SHOWN:
                    answer = await client.call(
                        "event.offline.list", {**params, "start": start}, idempotent=True
                    )
                    rows = answer.result if isinstance(answer.result, list) else []
                    entry["parked"].extend(
                        {k: row.get(k) for k in PARKED_FIELDS}
                        for row in rows
                        if isinstance(row, dict)
                    )
                    entry["total"] = answer.total
                    if answer.next is None or not rows or answer.next <= start:
                        break
                    start = answer.next
            except BridgeError as exc:
                entry["upstream_error"] = str(exc)
            out.append(entry)
    return {"portals": out}


async def request_replay(settings: Settings) -> dict[str, str]:
    """Drain parked events again: here when no process holds the state file, otherwise by
    asking the serving process (it picks the request up at its next poll tick)."""
    if settings.state_url is not None:
        # Scaled mode: the replica draining each portal takes the request.
        return {d: "handed to the serving replicas" for d in await _hand_over(settings, REPLAY)}
    lock = StateLock(settings.state_path)
    try:
        lock.acquire("parked --replay")
    except ConfigError:
        return {d: "handed to the serving process" for d in await _hand_over(settings, REPLAY)}
    lock.release()
    from bridge.service import Service

    service = Service(settings)
    results: dict[str, str] = {}
    try:
        await service.open(purpose="parked --replay")
        for session in service.sessions.values():
            session.queue.replay_requested = True
            ok = await session.drainer.run_once(full_check=False)
            results[session.portal.domain] = (
                "replayed"
                if ok
                else (f"failed: {session.drainer.last_error or session.drainer.stopped}")
            )
    finally:
        await service.close()
    return results


async def _hand_over(settings: Settings, kind: str) -> list[str]:
    """Leave a request of ``kind`` for every active portal to the serving process(es)."""
    state = await open_state(settings)
    try:
        portals = await state.portals()
        for portal in portals:
            await state.request(portal.member_id, kind)
    finally:
        await state.close()
    return [p.domain for p in portals]
