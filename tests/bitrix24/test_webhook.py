"""The webhook's answers, in process: every refused request changes nothing and calls nothing."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bridge.app import create_app
from bridge.bitrix24 import phpquery, webhook
from bridge.bitrix24.portals import PortalSession
from bridge.service import Service
from bridge.settings import load_settings
from bridge.state import Portal
from tests.harness import attach_portals

APP_TOKEN = "a" * 32
MEMBER = "m" * 32
PORTAL = Portal(
    member_id=MEMBER,
    domain="acme.example",
    client_endpoint="https://acme.example/rest/",
    access_token="acc",
    refresh_token="ref",
    application_token=APP_TOKEN,
)


class NoUpstream:
    """An upstream transport that records every request (there must be none)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(500, json={"error": "INTERNAL_SERVER_ERROR"})


Rig = tuple[httpx.AsyncClient, Service, NoUpstream]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    settings = load_settings(
        {
            "BRIDGE_CLIENT_ID": "app.1",
            "BRIDGE_CLIENT_SECRET": "secret",
            "BRIDGE_STATE_PATH": str(tmp_path / "s.sqlite3"),
        }
    )
    upstream = NoUpstream()
    service = Service(settings, transport=httpx.MockTransport(upstream))
    await attach_portals(service, PORTAL)
    assert service.state is not None
    app = create_app(settings, service=service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
        yield client, service, upstream
    await service.state.close()


def _session(service: Service) -> PortalSession:
    return service.sessions[MEMBER]


def _form(**fields: object) -> bytes:
    return phpquery.encode(fields).encode()


FORM = {"content-type": "application/x-www-form-urlencoded"}


async def test_authenticated_notification_wakes_the_drainer(rig: Rig) -> None:
    client, service, upstream = rig
    drainer = _session(service).drainer
    drainer._untimed = False
    body = _form(
        event="ONOFFLINEEVENT",
        data="",
        ts="1700000000",
        auth={"member_id": MEMBER, "application_token": APP_TOKEN, "domain": "acme.example"},
    )
    response = await client.post("/bitrix24/events", content=body, headers=FORM)
    assert response.status_code == 200
    assert drainer._pending_ts == 1700000000.0
    assert upstream.requests == []  # answered at once: draining happens elsewhere


async def test_json_bodies_are_accepted(rig: Rig) -> None:
    client, _service, _ = rig
    payload = {
        "event": "ONOFFLINEEVENT",
        "auth": {"member_id": MEMBER, "application_token": APP_TOKEN},
    }
    response = await client.post("/bitrix24/events", json=payload)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "auth",
    [
        {"member_id": MEMBER, "application_token": "b" * 32},  # wrong token
        {"member_id": "x" * 32, "application_token": APP_TOKEN},  # unknown portal
        {"member_id": MEMBER},  # no token
        None,  # no auth block
    ],
)
async def test_failed_authentication_is_401_and_does_nothing(
    rig: Rig, auth: dict[str, str] | None
) -> None:
    client, service, upstream = rig
    drainer = _session(service).drainer
    drainer._untimed = False
    fields: dict[str, object] = {"event": "ONOFFLINEEVENT", "ts": "1700000000"}
    if auth is not None:
        fields["auth"] = auth
    response = await client.post("/bitrix24/events", content=_form(**fields), headers=FORM)
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert drainer._pending_ts is None
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"event=", FORM, 400),
        (b"data=1", FORM, 400),
        (b"\xff\xfe=1", FORM, 400),
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"[1, 2]", {"content-type": "application/json"}, 400),
        (b"event=ONOFFLINEEVENT", {"content-type": "text/plain"}, 415),
        (b"event=ONOFFLINEEVENT", {}, 415),
        (b"a" * 70_000, FORM, 413),
    ],
)
async def test_bad_requests(rig: Rig, body: bytes, headers: dict[str, str], status: int) -> None:
    client, _service, upstream = rig
    response = await client.post("/bitrix24/events", content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert upstream.requests == []


async def test_streamed_oversized_body_is_413(rig: Rig) -> None:
    client, _service, upstream = rig

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000

    response = await client.post("/bitrix24/events", content=chunks(), headers=FORM)
    assert response.status_code == 413
    assert upstream.requests == []


async def test_shutting_down_is_503(rig: Rig) -> None:
    client, service, _ = rig
    service.closing = True
    body = _form(event="ONOFFLINEEVENT", auth={"member_id": MEMBER, "application_token": APP_TOKEN})
    response = await client.post("/bitrix24/events", content=body, headers=FORM)
    assert response.status_code == 503
    service.closing = False


async def test_error_bodies_never_echo_tokens(rig: Rig) -> None:
    client, _service, _ = rig
    secret = "s" * 40
    body = _form(event="ONAPPUNINSTALL", auth={"member_id": MEMBER, "application_token": secret})
    response = await client.post("/bitrix24/events", content=body, headers=FORM)
    assert response.status_code == 401
    assert secret not in response.text


async def test_notification_metrics_count_outcomes(rig: Rig) -> None:
    client, service, _ = rig
    await client.post("/bitrix24/events", content=b"event=ONOFFLINEEVENT", headers=FORM)
    await client.post("/bitrix24/events", content=b"x", headers={"content-type": "text/plain"})
    registry = service.metrics.registry
    unauthorized = registry.get_sample_value(
        "bitrix24_bridge_notifications_total",
        {"event": "ONOFFLINEEVENT", "outcome": "unauthorized"},
    )
    unsupported = registry.get_sample_value(
        "bitrix24_bridge_notifications_total", {"event": "other", "outcome": "unsupported"}
    )
    assert (unauthorized, unsupported) == (1.0, 1.0)


async def test_claimed_installs_are_rationed(rig: Rig) -> None:
    client, _service, upstream = rig
    body = _form(
        event="ONAPPINSTALL",
        auth={"member_id": "x" * 32, "refresh_token": "r", "application_token": "t"},
    )
    answers = [
        (await client.post("/bitrix24/events", content=body, headers=FORM)).status_code
        for _ in range(15)
    ]
    # Each attempt that is let through costs one OAuth request; the rest cost nothing.
    assert len(upstream.requests) == 10
    assert answers.count(503) == 15


def _notification(ts: int) -> bytes:
    return _form(
        event="ONOFFLINEEVENT",
        data="",
        ts=str(ts),
        auth={"member_id": MEMBER, "application_token": APP_TOKEN, "domain": "acme.example"},
    )


async def test_a_repeated_body_is_parsed_once(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    client, service, _ = rig
    webhook._parse_cached.cache_clear()
    decoded: list[str] = []

    def counting(query: str, **limits: int) -> dict[str, object]:
        decoded.append(query)
        return decode(query, **limits)

    decode = phpquery.decode
    monkeypatch.setattr(phpquery, "decode", counting)
    for _ in range(5):
        response = await client.post("/bitrix24/events", content=_notification(1), headers=FORM)
        assert response.status_code == 200
    assert len(decoded) == 1
    await client.post("/bitrix24/events", content=_notification(2), headers=FORM)
    assert len(decoded) == 2
    assert _session(service).drainer._pending_ts == 2.0


async def test_a_repeated_body_is_authenticated_every_time(rig: Rig) -> None:
    client, service, _ = rig
    body = _notification(3)
    assert (await client.post("/bitrix24/events", content=body, headers=FORM)).status_code == 200
    # The portal is uninstalled: the very same body, parsed before, no longer gets in.
    service.sessions.pop(MEMBER)
    response = await client.post("/bitrix24/events", content=body, headers=FORM)
    assert response.status_code == 401


async def test_the_parse_cache_is_bounded(rig: Rig) -> None:
    client, _service, _ = rig
    webhook._parse_cached.cache_clear()
    for body in (b"event=", b"data=1", b"\xff=1"):  # refused bodies are not kept
        assert (
            await client.post("/bitrix24/events", content=body, headers=FORM)
        ).status_code == 400
    assert webhook._parse_cached.cache_info().currsize == 0
    big = _notification(1) + b"&pad=" + b"x" * webhook.CACHED_BODY
    assert (await client.post("/bitrix24/events", content=big, headers=FORM)).status_code == 200
    assert webhook._parse_cached.cache_info().currsize == 0  # nor large ones
    for ts in range(200):
        await client.post("/bitrix24/events", content=_notification(ts), headers=FORM)
    info = webhook._parse_cached.cache_info()
    assert info.currsize == info.maxsize == 64
