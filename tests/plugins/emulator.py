"""Fixtures for the Bitrix24 portal emulator: running emulators, a notification sink, a client.

Everything talks over real loopback sockets; the emulator and the sink each run uvicorn in a
thread of their own, so plain synchronous tests can use them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer, ThreadedServer
from bridge.emulators.bitrix24.phpform import parse_str


@dataclass
class Notification:
    path: str
    content_type: str
    form: dict[str, Any]
    received_at: float
    body: bytes = b""


@dataclass
class NotificationSink:
    """An HTTP server that records every notification POSTed to it."""

    status: int = 200
    received: list[Notification] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadedServer = field(default_factory=ThreadedServer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/hook"

    async def _record(self, request: Request) -> Response:
        body = await request.body()
        notification = Notification(
            request.url.path,
            request.headers.get("content-type", ""),
            parse_str(body),
            time.monotonic(),
            body,
        )
        with self._changed:
            self.received.append(notification)
            self._changed.notify_all()
        return JSONResponse({"ok": self.status < 300}, status_code=self.status)

    def start(self) -> NotificationSink:
        self._server.bind()
        self._server.serve(
            Starlette(routes=[Route("/{path:path}", self._record, methods=["POST"])])
        )
        return self

    def stop(self) -> None:
        self._server.stop()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Notification]:
        """Block until ``count`` notifications arrived; fail the test otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                pytest.fail(f"expected {count} notifications, got {len(self.received)}")
            return list(self.received)

    def events(self, name: str) -> list[Notification]:
        return [n for n in self.received if n.form.get("event") == name]


class PortalClient:
    """A plain HTTP client of one emulator: REST calls, OAuth, and the control API."""

    def __init__(self, server: EmulatorServer, base_url: str | None = None) -> None:
        """``base_url``: one portal of a farm (default: the first)."""
        self.server = server
        self.http = httpx.Client(base_url=base_url or server.base_url, timeout=10.0)
        self._token: str | None = None

    def close(self) -> None:
        self.http.close()

    def app(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/_emulator/app").json()
        return answer

    def refresh(self, refresh_token: str, **overrides: str) -> httpx.Response:
        app = self.app()
        params = {
            "grant_type": "refresh_token",
            "client_id": app["client_id"],
            "client_secret": app["client_secret"],
            "refresh_token": refresh_token,
            **overrides,
        }
        return self.http.get("/oauth/token/", params=params)

    def new_token(self) -> str:
        answer = self.refresh(self.app()["refresh_token"])
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.new_token()
        return self._token

    def post(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        """A REST call with a JSON body; ``token=None`` sends none, default is an admin's."""
        token = kw.pop("token", self.token)
        body = dict(params or {})
        if token is not None:
            body["auth"] = token
        return self.http.post(f"/rest/{method}.json", json=body, **kw)

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self.post(method, params, **kw).json()
        return answer

    def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    def bind(self, *events: str, connector: str = "") -> None:
        for event in events:
            params = {"event": event, "event_type": "offline", "auth_connector": connector}
            assert self.result("event.bind", params) is True

    def add(self, *events: dict[str, Any] | str, connector: str = "") -> dict[str, Any]:
        items = [{"event": e} if isinstance(e, str) else e for e in events]
        response = self.http.post(
            "/_emulator/events", json={"events": items, "connector": connector}
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.post(f"/_emulator/{path}", json=body or {})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def queue(self, connector: str = "", *, detail: bool = False) -> dict[str, Any]:
        params = {"connector": connector, "detail": "1" if detail else "0"}
        answer: dict[str, Any] = self.http.get("/_emulator/queue", params=params).json()
        return answer

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/_emulator/stats").json()
        return answer


EmulatorFactory = Callable[..., EmulatorServer]


@pytest.fixture
def emulator_factory() -> Iterator[EmulatorFactory]:
    """``emulator_factory(rate_limit=None, ...)`` starts an emulator with that configuration."""
    started: list[EmulatorServer] = []

    def start(**config: Any) -> EmulatorServer:
        server = EmulatorServer(EmulatorConfig(**config)).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def emulator(emulator_factory: EmulatorFactory) -> EmulatorServer:
    """An emulator with a real portal's defaults."""
    return emulator_factory()


@pytest.fixture
def notification_sink() -> Iterator[NotificationSink]:
    sink = NotificationSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def portal_client_factory() -> Iterator[Callable[[EmulatorServer], PortalClient]]:
    clients: list[PortalClient] = []

    def make(server: EmulatorServer) -> PortalClient:
        client = PortalClient(server)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def portal(
    emulator: EmulatorServer, portal_client_factory: Callable[[EmulatorServer], PortalClient]
) -> PortalClient:
    """A client of the default ``emulator``, holding an administrator's token."""
    return portal_client_factory(emulator)
