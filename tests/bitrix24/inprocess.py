"""An offline queue wired to the emulator in this process and to the in-memory publisher.

No socket and no broker: the emulator's ASGI app answers through ``httpx.ASGITransport`` (the
transport seam httpx offers for exactly this), the broker is
:class:`~bridge.amqp.fake.MemoryPublisher`, the state a SQLite database in memory. A
:class:`Tap` between the two sees every REST request and may rewrite the answers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx

from bridge.amqp.fake import MemoryPublisher
from bridge.amqp.protocol import OutgoingMessage
from bridge.bitrix24.messages import Routing
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.offline_queue import CLEAR, OfflineQueue
from bridge.bitrix24.upstream import PortalClient
from bridge.emulators.bitrix24 import EmulatorConfig, create_emulator_app
from bridge.metrics import Metrics
from bridge.state import Portal, State

EVENT = "ONCRMLEADADD"
EXCHANGE = "bitrix24.oncrmleadadd"

# Rewrites the JSON answer of one REST request: (method, request body, answer body).
Rewrite = Callable[[str, dict[str, Any], dict[str, Any]], None]


class Tap(httpx.AsyncBaseTransport):
    """Records every REST request (method and JSON body); ``rewrite`` may change answers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.rewrite: Rewrite | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 1)[-1].removesuffix(".json")
        body: dict[str, Any] = {}
        if request.headers.get("content-type") == "application/json":
            body = json.loads(request.content)
        self.requests.append((method, body))
        response = await self.inner.handle_async_request(request)
        if self.rewrite is None or "/rest/" not in request.url.path:
            return response
        answer = json.loads(await response.aread())
        self.rewrite(method, body, answer)
        return httpx.Response(response.status_code, json=answer)

    def commands(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every call of ``method``, alone or as a batch command (JSON)."""
        found = [body for name, body in self.requests if name == method]
        for name, body in self.requests:
            if name == "batch":
                for command in (body.get("cmd") or {}).values():
                    path, _, query = str(command).partition("?")
                    if path == method:
                        found.append({"query": query})
        return found


@dataclass
class Rig:
    queue: OfflineQueue
    publisher: MemoryPublisher
    state: State
    tap: Tap
    control: httpx.AsyncClient  # the emulator's /_emulator/ API
    member_id: str
    metrics: Metrics
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def add(self, ids: Iterable[int], *, connector: str = "") -> None:
        """New events in the portal, one per ``ID``."""
        events = [{"event": EVENT, "data": {"FIELDS": {"ID": str(n)}}} for n in ids]
        body = {"events": events, "connector": connector}
        (await self.control.post("/_emulator/events", json=body)).raise_for_status()

    async def portal_queue(self, connector: str = "") -> dict[str, Any]:
        answer = await self.control.get("/_emulator/queue", params={"connector": connector})
        queue: dict[str, Any] = answer.json()
        return queue

    async def reserved_ids(self, connector: str = "") -> list[str]:
        """The ``ID`` of every event reserved in the portal, in queue order."""
        params = {"connector": connector, "detail": "1"}
        rows = (await self.control.get("/_emulator/queue", params=params)).json()["rows"]
        return [r["EVENT_DATA"]["FIELDS"]["ID"] for r in rows if r["PROCESS_ID"]]

    def stored_ids(self) -> list[str]:
        """The ``ID`` of every event the publisher stored, in order, copies included."""
        return [json.loads(m.body)["EVENT_DATA"]["FIELDS"]["ID"] for m in self.publisher.stored]

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


async def make_rig(*, connector: str = "", page_size: int = 50, **queue_kw: Any) -> Rig:
    """A fresh portal (no request-rate limit) and a queue draining it; close it after use."""
    config = EmulatorConfig(rate_limit=None, auto_bind=True, public_host="portal.test", port=8080)
    tap = Tap(httpx.ASGITransport(app=create_emulator_app(config)))
    control = httpx.AsyncClient(transport=tap, base_url=config.base_url)
    app = (await control.get("/_emulator/app")).json()
    grant = (
        await control.post(
            "/oauth/token/",
            data={
                "grant_type": "refresh_token",
                "client_id": app["client_id"],
                "client_secret": app["client_secret"],
                "refresh_token": app["refresh_token"],
            },
        )
    ).json()
    state = await State.open(":memory:")
    portal = Portal(
        member_id=app["member_id"],
        domain=app["domain"],
        client_endpoint=app["client_endpoint"],
        access_token=grant["access_token"],
        refresh_token=grant["refresh_token"],
        application_token=app["application_token"],
    )
    await state.save_portal(portal)
    http = httpx.AsyncClient(transport=tap)
    oauth = OAuthClient(
        http,
        oauth_url=app["oauth_url"],
        client_id=app["client_id"],
        client_secret=app["client_secret"],
    )
    metrics = Metrics()
    # No retries inside the client: every fault reaches the queue, and no test waits a back-off.
    client = PortalClient(
        portal,
        http=http,
        oauth=oauth,
        save=state.save_portal,
        metrics=metrics,
        rate_limit=1000,
        rate_burst=1000,
        max_rate_retries=0,
        max_fault_retries=0,
    )
    publisher = MemoryPublisher()
    routing = Routing(
        exchange_template="bitrix24.{event}",
        routing_key_template="{domain}",
        member_id=portal.member_id,
        domain=portal.domain,
        connector=connector,
    )
    queue = OfflineQueue(
        client,
        state=state,
        publisher=publisher,
        routing=routing,
        metrics=metrics,
        page_size=page_size,
        **queue_kw,
    )
    return Rig(
        queue,
        publisher,
        state,
        tap,
        control,
        portal.member_id,
        metrics,
        [control.aclose, http.aclose, state.close],
    )


MakeRig = Callable[..., Awaitable[Rig]]


def event_id(message: OutgoingMessage) -> str:
    """The ``ID`` the test gave the event (``EVENT_DATA.FIELDS.ID``), not the queue row's."""
    fields: dict[str, str] = json.loads(message.body)["EVENT_DATA"]["FIELDS"]
    return fields["ID"]


def ids_in(*wanted: str) -> Callable[[OutgoingMessage], bool]:
    """A publisher refusal rule: the events with these ``ID``s."""
    return lambda message: event_id(message) in wanted


def cleared_ids(rig: Rig) -> list[str]:
    """MESSAGE_IDs named by every ``event.offline.clear`` sent, alone or in a batch."""
    names: list[str] = []
    for params in rig.tap.commands(CLEAR):
        if "query" in params:
            pairs = parse_qsl(params["query"])
            names += [value for key, value in pairs if key.startswith("message_id")]
        else:
            names += params["message_id"]
    return names


def break_row(wanted: str, field: str) -> Rewrite:
    """An answer rewrite: the row of event ``wanted`` loses ``field`` in every reservation read."""

    def rewrite(method: str, _body: dict[str, Any], answer: dict[str, Any]) -> None:
        results = answer.get("result", {})
        pages = results.get("result", {}).values() if method == "batch" else [results]
        for page in pages:
            for row in page.get("events", []) if isinstance(page, dict) else []:
                if row["EVENT_DATA"]["FIELDS"]["ID"] == wanted:
                    row.pop(field)

    return rewrite
