"""The service's own rules: one drainer per portal whatever installs do; liveness by progress."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from bridge.core.drainer import Drainer
from bridge.core.source import PassReport
from bridge.emulators.bitrix24 import EmulatorServer
from bridge.metrics import Metrics
from bridge.service import STUCK_AFTER, Service
from bridge.settings import load_settings
from tests.harness import Portal, bridge_env, until
from tests.plugins.broker import AmqpNamespace
from tests.waiting import holds


def _drain_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("drain ") and not t.done()]


async def test_concurrent_installs_leave_one_drainer_and_close_stops_it(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal, port = emulated
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    for name in ("BRIDGE_PORTAL_URL", "BRIDGE_REFRESH_TOKEN", "BRIDGE_APPLICATION_TOKEN"):
        env.pop(name)
    env["BRIDGE_EVENTS"] = "ONCRMLEADADD"
    env["BRIDGE_PUBLIC_URL"] = "http://127.0.0.1:9"  # binding fails slowly enough to overlap
    service = Service(load_settings(env))
    await service.open()
    try:
        await service.start_draining()
        installs = []
        for _ in range(4):
            app = await portal.app()  # a fresh refresh token for each install
            installs.append(
                service.bitrix24.install(
                    app["member_id"], app["refresh_token"], app["application_token"]
                )
            )
        await asyncio.gather(*installs)
        assert len(service.sessions) == 1
        assert len(_drain_tasks()) == 1, [t.get_name() for t in _drain_tasks()]
    finally:
        await service.close()
    assert _drain_tasks() == []
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("bind ")] == []


class OneDrainer:
    """A source group of one drainer."""

    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer

    async def open(self) -> None:
        return None

    def drainers(self) -> list[Drainer]:
        return [self.drainer]

    async def poll(self) -> None:
        return None

    def health(self) -> list[dict[str, object]]:
        return []

    async def close(self) -> None:
        return None


class SlowSource:
    """A pass that runs as long as the test wants; its progress is set by hand."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.progress_at = time.monotonic()

    @property
    def name(self) -> str:
        return "slow.example"

    def request_stop(self) -> None:
        self.gate.set()

    async def run_pass(self, *, full_check: bool) -> PassReport:
        await self.gate.wait()
        return PassReport()


async def test_a_long_pass_that_keeps_moving_is_alive_one_that_stalls_is_not(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        {
            "BRIDGE_CLIENT_ID": "local.x",
            "BRIDGE_CLIENT_SECRET": "secret",
            "BRIDGE_STATE_PATH": str(tmp_path / "s.sqlite3"),
        }
    )
    service = Service(settings)
    source = SlowSource()
    drainer = Drainer(source, metrics=Metrics())
    service.groups = [OneDrainer(drainer)]
    drainer.start()
    try:
        await until(holds(lambda: drainer.in_pass), "the pass to start")
        now = time.monotonic()
        drainer.beat = now - 2 * STUCK_AFTER  # the pass started long ago...
        source.progress_at = now  # ...and pages still flow
        assert service.liveness() is None
        source.progress_at = now - STUCK_AFTER - 1  # nothing moved for too long
        problem = service.liveness()
        assert problem is not None
        assert "no progress" in problem
    finally:
        await drainer.stop(1)
        await service.http.aclose()


async def test_readyz_reports_a_failed_binding_and_status_shows_it(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    from tests.harness import bridge_in_process

    _server, portal, port = emulated
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    for name in ("BRIDGE_PORTAL_URL", "BRIDGE_REFRESH_TOKEN", "BRIDGE_APPLICATION_TOKEN"):
        env.pop(name)
    env["BRIDGE_EVENTS"] = "ONCRMLEADADD"
    async with bridge_in_process(env) as bridge:
        await portal.faults(
            fail_with={"event.bind": {"error": "ERROR_WRONG_HANDLER_URL", "count": 1}}
        )
        app = await portal.app()
        await bridge.service.bitrix24.install(
            app["member_id"], app["refresh_token"], app["application_token"]
        )
        async with httpx.AsyncClient() as http:

            async def binding_failed() -> bool:
                portals = (await http.get(f"{bridge.url}/readyz")).json()["portals"]
                return bool(portals) and "binding_error" in portals[0]

            await until(binding_failed, "/readyz to report the failed binding")
            ready = (await http.get(f"{bridge.url}/readyz")).json()
            metrics = (await http.get(f"{bridge.url}/metrics")).text
        (detail,) = ready["portals"]
        assert "ERROR_WRONG_HANDLER_URL" in detail["binding_error"]
        assert "bitrix24_bridge_binding_failed{portal=" in metrics
        line = next(
            m for m in metrics.splitlines() if m.startswith("bitrix24_bridge_binding_failed{")
        )
        assert line.endswith(" 1.0")
        from bridge.bitrix24.tools import portal_status

        async def reported() -> bool:
            report = await portal_status(load_settings(env), ask_upstream=False)
            return bool(report["portals"][0]["binding_error"])

        await until(reported, "status to show the failed binding")
        report = await portal_status(load_settings(env), ask_upstream=False)
        assert "ERROR_WRONG_HANDLER_URL" in report["portals"][0]["binding_error"]
