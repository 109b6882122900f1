"""No token accident or CLI command stops a portal.

Refresh tokens rotate: whoever refreshes last holds the only live one. So one process owns a
state file (a lock), ``status`` never refreshes, a refresh that the OAuth server answered reaches
the state file even when its caller is cancelled, a token refused on one batch command is
refreshed and retried, and a token rotated elsewhere is adopted before a portal is declared dead.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from aiolimiter import AsyncLimiter

from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.upstream import PortalClient
from bridge.emulators.bitrix24 import EmulatorServer
from bridge.metrics import Metrics
from bridge.state import Portal, State
from tests.harness import BridgeProcess, bridge_env, bridge_in_process, until
from tests.harness import Portal as EmulatedPortal
from tests.plugins.broker import AmqpNamespace


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _stored(path: Path) -> Portal:
    state = await State.open(str(path))
    try:
        (portal,) = await state.portals()
    finally:
        await state.close()
    return portal


async def test_cli_beside_serve_never_kills_its_token(
    emulated: tuple[EmulatorServer, EmulatedPortal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    state_path = tmp_path / "state.sqlite3"
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(
        portal,
        amqp_ns,
        state_path,
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_EVENTS="ONCRMLEADADD",
        BRIDGE_POLL_INTERVAL="0",  # the serving process calls the portal only when notified
    )
    bridge = BridgeProcess(env, tmp_path / "serve.log")
    bridge.start()
    try:
        await bridge.wait_live()
        await until(lambda: _has_portal(state_path), "the portal to be bootstrapped")
        before = await _stored(state_path)
        await portal.faults(expire_tokens=True)  # every command would have to refresh now

        drain = _cli(env, "drain")
        assert drain.returncode == 2, drain.stderr
        assert "in use by another bitrix24-bridge process (serve, pid" in drain.stderr
        assert "Traceback" not in drain.stderr
        bind = _cli(env, "bind")
        assert bind.returncode == 2, bind.stderr
        status = _cli(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        # Nothing refreshed the token behind the serving process's back.
        assert (await _stored(state_path)).refresh_token == before.refresh_token

        # ...so the serving process still drains (refreshing once, itself).
        await portal.generate("ONCRMLEADADD", 30)
        await collector.wait_for(30, timeout=60)
        await portal.wait_empty(timeout=30)
    finally:
        bridge.stop()
    assert (await _stored(state_path)).refresh_token != before.refresh_token


async def _has_portal(path: Path) -> bool:
    state = await State.open(str(path))
    try:
        return bool(await state.portals())
    finally:
        await state.close()


async def test_a_token_refused_on_one_batch_command_is_refreshed_and_retried(
    emulated: tuple[EmulatorServer, EmulatedPortal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        # One reservation inside a batch answers expired_token; the batch itself is fine.
        await portal.faults(fail_with={"event.offline.get": {"error": "expired_token", "count": 1}})
        await portal.generate("ONCRMLEADADD", 120)
        await collector.wait_for(120, timeout=60)
        await portal.wait_empty(timeout=30)
        assert session.drainer.stopped is None
        refreshed = bridge.service.metrics.registry.get_sample_value(
            "bitrix24_bridge_token_refreshes_total", {"outcome": "ok"}
        )
        assert refreshed == 1


async def test_a_fresh_token_refused_too_stops_the_portal_with_a_reason(
    emulated: tuple[EmulatorServer, EmulatedPortal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        await portal.faults(
            fail_with={"event.offline.get": {"error": "expired_token", "count": 1000}}
        )
        await portal.generate("ONCRMLEADADD", 5)
        await until(_true_when(lambda: session.drainer.stopped is not None), "a stop", 30)
        assert "expired_token" in (session.drainer.stopped or "")
        stopped = bridge.service.metrics.registry.get_sample_value(
            "bitrix24_bridge_portal_stopped", {"portal": session.portal.domain}
        )
        assert stopped == 1
        async with httpx.AsyncClient() as http:
            ready = (await http.get(f"{bridge.url}/readyz")).json()
        (detail,) = ready["portals"]
        assert detail["state"] == "stopped"
        assert "expired_token" in detail["reason"]


def _true_when(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


class _Gate:
    """A state ``save`` that blocks until released: the worst moment for a cancellation."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def save(self, portal: Portal) -> None:
        self.entered.set()
        await self.release.wait()
        await self.state.save_portal(portal)


async def _portal_from(server: Any, state: State) -> tuple[Portal, dict[str, str]]:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        app = (await http.get("/_emulator/app")).json()
    oauth_answer = await _refresh(server.base_url, app, app["refresh_token"])
    portal = Portal(
        member_id=app["member_id"],
        domain=app["domain"],
        client_endpoint=app["client_endpoint"],
        access_token=oauth_answer["access_token"],
        refresh_token=oauth_answer["refresh_token"],
        application_token=app["application_token"],
    )
    await state.save_portal(portal)
    return portal, app


async def _refresh(base_url: str, app: dict[str, str], token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        answer = await http.get(
            "/oauth/token/",
            params={
                "grant_type": "refresh_token",
                "client_id": app["client_id"],
                "client_secret": app["client_secret"],
                "refresh_token": token,
            },
        )
    body: dict[str, Any] = answer.json()
    return body


def _client(
    portal: Portal, http: httpx.AsyncClient, app: dict[str, str], **kw: Any
) -> PortalClient:
    oauth = OAuthClient(
        http,
        oauth_url=app["oauth_url"],
        client_id=app["client_id"],
        client_secret=app["client_secret"],
    )
    return PortalClient(
        portal, http=http, oauth=oauth, metrics=Metrics(), rate_limit=100, rate_burst=100, **kw
    )


async def test_a_cancelled_refresh_still_saves_the_rotated_token(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    state = await State.open(str(tmp_path / "s.sqlite3"))
    try:
        portal, app = await _portal_from(emulator, state)
        gate = _Gate(state)
        async with httpx.AsyncClient() as http:
            client = _client(portal, http, app, save=gate.save, load=state.portal)
            async with httpx.AsyncClient(base_url=emulator.base_url) as control:
                await control.post("/_emulator/faults", json={"expire_tokens": True})
            call = asyncio.create_task(client.call("feature.get", {"CODE": "x"}, idempotent=True))
            await asyncio.wait_for(gate.entered.wait(), 10)  # the OAuth server rotated already
            call.cancel()  # a shutdown, say
            gate.release.set()
            await client.aclose()
        stored = await state.portal(portal.member_id)
    finally:
        await state.close()
    assert stored is not None
    assert stored.refresh_token != portal.refresh_token
    assert stored.refresh_token == client.portal.refresh_token
    # The new token is the live one: it refreshes, the old one is refused.
    assert "access_token" in await _refresh(emulator.base_url, app, stored.refresh_token)
    assert (await _refresh(emulator.base_url, app, portal.refresh_token))[
        "error"
    ] == "invalid_grant"


async def test_a_token_rotated_elsewhere_is_adopted_instead_of_stopping(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    state = await State.open(str(tmp_path / "s.sqlite3"))
    try:
        portal, app = await _portal_from(emulator, state)
        async with httpx.AsyncClient() as http:
            ours = _client(portal, http, app, save=state.save_portal, load=state.portal)
            theirs = _client(portal, http, app, save=state.save_portal, load=state.portal)
            async with httpx.AsyncClient(base_url=emulator.base_url) as control:
                await control.post("/_emulator/faults", json={"expire_tokens": True})
            # Another client of the same state file refreshes first: our refresh token is dead.
            await theirs.call("feature.get", {"CODE": "x"}, idempotent=True)
            answer = await ours.call("feature.get", {"CODE": "x"}, idempotent=True)
        assert answer.result == {"value": "N"}
        assert ours.portal.refresh_token == theirs.portal.refresh_token
    finally:
        await state.close()


async def test_a_request_waiting_for_its_turn_sends_the_token_refreshed_meanwhile(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    state = await State.open(str(tmp_path / "s.sqlite3"))
    try:
        portal, app = await _portal_from(emulator, state)
        async with httpx.AsyncClient() as http:
            client = _client(portal, http, app, save=state.save_portal, load=state.portal)
            client.limiter = AsyncLimiter(1, 0.5)  # one request per half second, no burst
            async with httpx.AsyncClient(base_url=emulator.base_url) as control:
                await control.post("/_emulator/faults", json={"expire_tokens": True})
            # The second waits for its turn while the first is refused and refreshes the token.
            await asyncio.gather(
                *(client.call("feature.get", {"CODE": "x"}, idempotent=True) for _ in range(2))
            )
    finally:
        await state.close()
    # The refused request and its retry, then the waiting one with the fresh token at once
    # (it used to go out with the token read before its wait, refused a second time).
    assert client.requests == 3
