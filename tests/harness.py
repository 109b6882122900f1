"""Running the bridge in tests: in this process (uvicorn on a loopback port) or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from bridge.app import create_app
from bridge.diadoc.settings import load_diadoc_settings
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.server import Server
from bridge.service import Service
from bridge.settings import load_settings
from bridge.state import Portal as PortalRecord

if TYPE_CHECKING:  # the plugin is pytest's to import first (assertion rewriting)
    from tests.plugins.broker import AmqpNamespace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class InProcessBridge:
    url: str
    service: Service

    @property
    def events_url(self) -> str:
        return f"{self.url}/bitrix24/events"


@contextlib.asynccontextmanager
async def bridge_in_process(
    env: Mapping[str, str], *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[InProcessBridge]:
    """``transport`` (optional) carries every upstream request: a seam to corrupt answers."""
    settings = load_settings(dict(env))
    port = int(env.get("BRIDGE_HTTP_PORT") or free_port())
    app = create_app(settings, transport=transport, diadoc=load_diadoc_settings(dict(env)))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", access_log=False
    )
    server = Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
        raise RuntimeError("the bridge did not start")
    try:
        yield InProcessBridge(url=f"http://127.0.0.1:{port}", service=app.state.service)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


class BridgeProcess:
    """``bitrix24-bridge serve`` as a child process, to kill and restart."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = int(env.get("BRIDGE_HTTP_PORT") or free_port())
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            **env,
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_HTTP_PORT": str(self.port),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1

    async def wait_live(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bridge exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if (await client.get(f"{self.url}/livez", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"bridge not live: {self.tail()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Portal:
    """The emulator's control API, as a test uses it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)

    async def close(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, body: object | None = None) -> dict[str, Any]:
        response = await self.http.request(method, path, json=body)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def app(self) -> dict[str, str]:
        return await self._json("GET", "/_emulator/app")

    async def generate(self, event: str, count: int, start_id: int = 1) -> dict[str, Any]:
        body = {"generate": {"event": event, "count": count, "start_id": start_id}}
        return await self._json("POST", "/_emulator/events", body)

    async def add(self, events: list[dict[str, object]]) -> dict[str, Any]:
        return await self._json("POST", "/_emulator/events", {"events": events})

    async def queue(self) -> dict[str, Any]:
        return await self._json("GET", "/_emulator/queue")

    async def calls(self) -> dict[str, int]:
        return await self._json("GET", "/_emulator/calls")

    async def stats(self) -> dict[str, Any]:
        return await self._json("GET", "/_emulator/stats")

    async def faults(self, **faults: object) -> dict[str, Any]:
        return await self._json("POST", "/_emulator/faults", faults)

    async def notify(self) -> dict[str, Any]:
        return await self._json("POST", "/_emulator/notify", {})

    async def is_empty(self) -> bool:
        queue: dict[str, object] = await self.queue()
        return queue["free"] == 0 and queue["reserved"] == {}

    async def wait_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.is_empty():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the portal queue is not empty: {await self.queue()}")


async def bridge_env(
    portal: Portal, amqp: AmqpNamespace, state_path: Path, **extra: str
) -> dict[str, str]:
    """The environment of a bridge bootstrapped against an emulated portal."""
    app = await portal.app()
    env = {
        "BRIDGE_AMQP_URL": amqp.url,
        "BRIDGE_EXCHANGE_TEMPLATE": amqp.exchange_template,
        "BRIDGE_UNROUTED_EXCHANGE": amqp.unrouted_exchange,
        "BRIDGE_CLIENT_ID": app["client_id"],
        "BRIDGE_CLIENT_SECRET": app["client_secret"],
        "BRIDGE_OAUTH_URL": app["oauth_url"],
        "BRIDGE_PORTAL_URL": portal.base_url,
        "BRIDGE_REFRESH_TOKEN": app["refresh_token"],
        "BRIDGE_APPLICATION_TOKEN": app["application_token"],
        "BRIDGE_STATE_PATH": str(state_path),
        "BRIDGE_POLL_INTERVAL": "2",
        "BRIDGE_RATE_LIMIT": "500",
        "BRIDGE_RATE_BURST": "500",
        "BRIDGE_LOG_FORMAT": "text",
        "BRIDGE_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def emulated_portal(
    *, min_timeout: float = 0
) -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    """An unthrottled emulated portal whose notifications go to a bridge port chosen ahead."""
    bridge_port = free_port()
    config = EmulatorConfig(
        handler_url=f"http://127.0.0.1:{bridge_port}/bitrix24/events",
        min_timeout=min_timeout,
        rate_limit=None,
        auto_bind=True,
    )
    server = EmulatorServer(config).start()
    portal = Portal(server.base_url)
    try:
        yield server, portal, bridge_port
    finally:
        await portal.close()
        server.stop()


async def until(predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` answers true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def attach_portals(service: Service, *portals: PortalRecord) -> None:
    """Open a service's state and its Bitrix24 group by hand (no broker, no bootstrap), with
    ``portals`` stored and their sessions made: for webhook tests through an ASGI transport."""
    from bridge.bitrix24.portals import Portals
    from bridge.state import State

    service.state = await State.open(service.settings.state_path)
    group = Portals(
        service.settings,
        state=service.state,
        publisher=service.publisher,
        metrics=service.metrics,
        http=service.http,
        oauth=service.oauth,
    )
    service._bitrix24 = group
    service.groups = [group]
    for portal in portals:
        await service.state.save_portal(portal)
        group._session(portal)
