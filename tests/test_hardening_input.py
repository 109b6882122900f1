"""Hostile input: whatever the internet POSTs, the webhook answers a documented code, calls no one.

The in-process part drives the ASGI app through ``httpx.ASGITransport`` with an upstream transport
that records every request; the socket part runs the whole bridge (uvicorn, emulator, broker)
and talks raw HTTP to it: slow, truncated and malformed requests.

Checked by breaking the code on purpose (then restored), each making the named test fail:
- ``webhook._text`` without its encode check: a JSON lone surrogate answers 500
  (``test_webhook_answers_only_documented_codes_and_calls_no_one``);
- ``webhook._ts`` without the ``OverflowError``/``isfinite`` checks: a 400-digit ``ts`` answers
  500 and ``ts=nan`` leaves the drainer not due (``test_genuine_notification_...``,
  ``test_nan_ts_does_not_silence_later_notifications``);
- the webhook's old parser limits (1,000 keys, 16 deep): ``test_parsing_..._is_cheap``;
- ``webhook.read_body`` keeping every body in a module-level list: RSS grew by 115 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.app import create_app
from bridge.bitrix24 import phpquery, webhook
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.service import Service
from bridge.settings import load_settings
from bridge.state import Portal as StoredPortal
from tests.harness import (
    Portal,
    attach_portals,
    bridge_env,
    bridge_in_process,
    free_port,
    until,
)
from tests.plugins.broker import AmqpNamespace

# CI stays fast by default; HYPOTHESIS_PROFILE=thorough digs deeper.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DOCUMENTED = {200, 400, 401, 413, 415, 503}
APP_TOKEN = "a" * 32
MEMBER = "m" * 32
STORED = StoredPortal(
    member_id=MEMBER,
    domain="acme.example",
    client_endpoint="https://acme.example/rest/",
    access_token="acc",
    refresh_token="ref",
    application_token=APP_TOKEN,
)
FORM = "application/x-www-form-urlencoded"

# -- strategies -------------------------------------------------------------------------------

# Characters that matter to a PHP query string, plus a little of everything else.
_php_chars = st.sampled_from(list("[]&=%+.; _0123456789abAZ-\x00\u00e9\u4e2d"))
php_like = st.text(_php_chars, max_size=200) | st.text(max_size=200)
_segment = st.text(st.sampled_from(list("ab0-1[]% ._")), max_size=6)


@st.composite
def php_names(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(["event", "auth", "data", "ts", "a", "", " x.y"]))
    segments = draw(st.lists(_segment, max_size=20))
    return base + "".join(f"[{s}]" for s in segments)


@st.composite
def form_bodies(draw: st.DrawFn) -> bytes:
    pairs = draw(
        st.lists(st.tuples(php_names(), st.text(max_size=20)), max_size=30)
        | st.lists(st.tuples(st.just("a[]"), st.just("1")), min_size=990, max_size=1010)
    )
    body = "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        # Percent escapes that decode to invalid UTF-8, and raw invalid bytes.
        body += draw(st.sampled_from([b"&x=%ff%fe", b"&\xff\xfe=1", b"&%c0%80=1", b""]))
    return body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return json.dumps(draw(json_values)).encode()
    if kind == 1:
        doc: dict[str, object] = {
            "event": draw(st.sampled_from(["ONOFFLINEEVENT", "ONAPPINSTALL", "ONAPPUNINSTALL"]))
        }
        doc["auth"] = draw(st.dictionaries(st.sampled_from(AUTH_KEYS), json_values, max_size=4))
        return json.dumps(doc).encode()
    if kind == 2:
        # Lone surrogates and giant integers are valid JSON text.
        return draw(
            st.sampled_from(
                [
                    b'{"event":"ONOFFLINEEVENT","auth":{"member_id":"\\ud800",'
                    b'"application_token":"\\udfff"}}',
                    b'{"event":"ONAPPINSTALL","auth":{"member_id":"\\ud800",'
                    b'"refresh_token":"\\ud800","application_token":"x"}}',
                    b'{"event":"\\ud800"}',
                    b"[" * 50_000 + b"]" * 50_000,
                    b'{"event":"ONOFFLINEEVENT","ts":' + b"9" * 5000 + b"}",
                ]
            )
        )
    return draw(st.binary(max_size=300))


AUTH_KEYS = ["member_id", "application_token", "refresh_token", "domain", "client_endpoint"]
content_types = st.sampled_from(
    [
        FORM,
        f"{FORM}; charset=utf-8",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
        "\u00e9/\u00e9",
    ]
)


@st.composite
def authenticated_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A genuine ONOFFLINEEVENT with hostile extras: it must always be accepted (200)."""
    ts = draw(
        st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "", "x", "9" * 400])
        | st.floats().map(repr)
        | st.integers().map(str)
    )
    extra = draw(st.lists(st.tuples(php_names(), st.text(max_size=10)), max_size=10))
    if draw(st.booleans()):
        doc: dict[str, object] = {
            "event": "ONOFFLINEEVENT",
            "auth": {"member_id": MEMBER, "application_token": APP_TOKEN},
            "data": draw(json_values),
        }
        raw = json.dumps(doc)
        # Splice the ts in as a raw JSON literal when it is one (400 digits, NaN, Infinity).
        literal = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(ts, ts)
        try:
            json.loads(literal)
        except ValueError:
            literal = json.dumps(ts)
        return "application/json", (raw[:-1] + f',"ts":{literal}}}').encode()
    fields = [(k, v) for k, v in extra if not k.startswith(("event", "auth"))]
    fields += [
        ("event", "ONOFFLINEEVENT"),
        ("ts", ts),
        ("auth[member_id]", MEMBER),
        ("auth[application_token]", APP_TOKEN),
    ]
    body = "&".join(f"{k}={v}" for k, v in fields)
    return FORM, body.encode("utf-8", "surrogatepass")


# -- phpquery ---------------------------------------------------------------------------------


@given(php_like | php_names())
def test_decode_raises_only_value_error(query: str) -> None:
    try:
        decoded = phpquery.decode(query)
    except ValueError:
        return
    assert isinstance(decoded, dict)


@given(st.binary(max_size=400))
def test_decode_of_bytes_raises_only_value_error(query: bytes) -> None:
    try:
        decoded = phpquery.decode(query)
    except ValueError:  # UnicodeDecodeError included
        return
    assert isinstance(decoded, dict)


def test_decode_refuses_what_would_cost_too_much() -> None:
    with pytest.raises(ValueError, match="keys"):
        phpquery.decode("&".join(["a[]=1"] * 1001))
    with pytest.raises(ValueError, match="deeper"):
        phpquery.decode("a" + "[x]" * 17 + "=1")
    with pytest.raises(UnicodeDecodeError):
        phpquery.decode(b"a=\xff")
    # The limits are not off by one.
    assert len(phpquery.decode("&".join(["a[]=1"] * 1000))["a"]) == 1000
    assert phpquery.decode("a" + "[x]" * 16 + "=1")["a"]["x"]


# -- the webhook, in process ------------------------------------------------------------------


class RecordingUpstream:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(500, json={"error": "INTERNAL_SERVER_ERROR"})

    def rest_calls(self) -> list[str]:
        return [r.url.path for r in self.requests if r.url.path.startswith("/rest/")]


@dataclass
class Rig:
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    service: Service
    upstream: RecordingUpstream

    def post(self, body: bytes, content_type: str | None) -> httpx.Response:
        headers = {} if content_type is None else {b"content-type": content_type.encode("latin-1")}
        return self.loop.run_until_complete(
            self.client.post("/bitrix24/events", content=body, headers=headers)
        )


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One app for all examples: hypothesis re-runs a test body, not its fixtures."""
    path = tmp_path_factory.mktemp("webhook") / "s.sqlite3"
    loop = asyncio.new_event_loop()
    settings_ = load_settings(
        {
            "BRIDGE_CLIENT_ID": "app.1",
            "BRIDGE_CLIENT_SECRET": "secret",
            "BRIDGE_STATE_PATH": str(path),
        }
    )
    upstream = RecordingUpstream()
    service = Service(settings_, transport=httpx.MockTransport(upstream))

    async def setup() -> httpx.AsyncClient:
        await attach_portals(service, STORED)
        app = create_app(settings_, service=service)
        # raise_app_exceptions=False: a crash must show up as the 500 a real server would send.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://bridge")

    client = loop.run_until_complete(setup())
    try:
        yield Rig(loop, client, service, upstream)
    finally:
        assert service.state is not None
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(service.http.aclose())
        loop.run_until_complete(service.state.close())
        loop.close()


def _check_refusal(rig: Rig, response: httpx.Response) -> None:
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:200])
    assert response.status_code != 200 or rig.service.sessions
    body = response.json()
    assert set(body) <= {"error", "status"}
    assert len(response.content) < 200
    assert APP_TOKEN not in response.text


@given(body=form_bodies() | json_bodies() | st.binary(max_size=2000), content_type=content_types)
def test_webhook_answers_only_documented_codes_and_calls_no_one(
    rig: Rig, body: bytes, content_type: str
) -> None:
    before = len(rig.upstream.requests)
    response = rig.post(body, content_type)
    _check_refusal(rig, response)
    # Nothing here carries the stored application token: nothing may be accepted...
    assert response.status_code != 200
    # ...and nothing may reach the portal. Only a claimed install asks the OAuth server
    # (that is how an install is proven), and only at its token endpoint.
    for request in rig.upstream.requests[before:]:
        assert request.url.path == "/oauth/token/", request.url
        assert b"ONAPPINSTALL" in body.upper()
    assert rig.upstream.rest_calls() == []


@given(authenticated_bodies())
def test_genuine_notification_with_hostile_extras_is_accepted(
    rig: Rig, case: tuple[str, bytes]
) -> None:
    content_type, body = case
    drainer = rig.service.sessions[MEMBER].drainer
    drainer._untimed, drainer._pending_ts = False, None
    response = rig.post(body, content_type)
    if response.status_code == 400:
        # Only a body the parser refuses as a whole (too many keys, too deep) may fail.
        with pytest.raises(webhook.Refused):
            webhook.parse(content_type, body)
        return
    assert response.status_code == 200, (response.status_code, body[:200])
    # Whatever ts said (NaN, infinity, 400 digits), the drainer is due: the event is not lost.
    assert drainer._due()
    assert rig.upstream.rest_calls() == []


def test_nan_ts_does_not_silence_later_notifications(rig: Rig) -> None:
    drainer = rig.service.sessions[MEMBER].drainer
    drainer._untimed, drainer._pending_ts, drainer._covered = False, None, 1_700_000_000.0
    auth = f"&auth[member_id]={MEMBER}&auth[application_token]={APP_TOKEN}"
    assert rig.post(b"event=ONOFFLINEEVENT&ts=nan" + auth.encode(), FORM).status_code == 200
    later = b"event=ONOFFLINEEVENT&ts=1700000005" + auth.encode()
    assert rig.post(later, FORM).status_code == 200
    assert drainer._due(), "a NaN ts swallowed the notification that followed it"


def test_parsing_an_unauthenticated_body_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing runs on the event loop before anyone is authenticated: its work is bounded.

    Before the limits (1,000 keys, 16 deep) one 55 KB body took ~0.1 s of loop time, so ten
    requests a second would stall the drain and the broker heartbeats. Counted in assignments,
    not seconds: a slow machine must not make this fail, nor a fast one hide a regression.
    """
    paths: list[int] = []
    assign = phpquery._assign

    def counting(root: phpquery._PhpArray, path: list[Any], value: str) -> None:
        paths.append(len(path))
        assign(root, path, value)

    monkeypatch.setattr(phpquery, "_assign", counting)
    keys, depth = webhook.NOTIFICATION_KEYS, webhook.NOTIFICATION_DEPTH
    worst = "&".join(f"d{i}" + "[a]" * 16 + "=1" for i in range(1000))
    too_many = "&".join(f"d{i}=1" for i in range(keys + 1))
    too_deep = "event=ONOFFLINEEVENT&d" + "[a]" * (depth + 1) + "=1"
    for body in (worst, too_many, too_deep):
        with pytest.raises(webhook.Refused):
            webhook.parse(FORM, body.encode())
    # The count is checked before any work and the depth before a value is placed: the only
    # value placed is too_deep's leading ``event``.
    assert paths == [1]
    paths.clear()
    widest = "&".join(f"d{i}" + "[a]" * depth + "=1" for i in range(keys))
    with pytest.raises(webhook.Refused):  # accepted by the parser, but it has no event
        webhook.parse(FORM, widest.encode())
    assert len(paths) == keys
    assert max(paths) == depth + 1


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _nested_body(seed: int) -> bytes:
    parts = [f"event=ONOFFLINEEVENT&auth[member_id]={seed:032x}"]
    size = len(parts[0])
    index = 0
    while size < 60_000:
        # Long names, as deep and as many as a notification may be: the parser does real work.
        key = f"data[k{seed}][{index}][deep][{'x' * 520}]={'v' * 8}"
        parts.append(key)
        size += len(key) + 1
        index += 1
    body = "&".join(parts).encode()
    assert 59_000 < len(body) <= 65_536
    return body


def test_memory_stays_bounded_under_2000_large_nested_bodies(rig: Rig) -> None:
    bodies = [_nested_body(n) for n in range(8)]

    async def flood(count: int) -> list[int]:
        statuses = []
        for n in range(count):
            response = await rig.client.post(
                "/bitrix24/events", content=bodies[n % len(bodies)], headers={"content-type": FORM}
            )
            statuses.append(response.status_code)
        return statuses

    rig.loop.run_until_complete(flood(200))  # warm up caches and allocator arenas
    before = _rss_kib()
    statuses = rig.loop.run_until_complete(flood(2000))
    grown = _rss_kib() - before
    assert set(statuses) == {401}
    assert grown < 6 * 1024, f"RSS grew by {grown} KiB over 2,000 requests"
    assert rig.upstream.rest_calls() == []


# -- the whole bridge, over a real socket -----------------------------------------------------


@dataclass
class Live:
    host: str
    port: int
    portal: Portal
    app: dict[str, str]
    service: Service


@pytest.fixture
async def live(amqp_ns: AmqpNamespace, tmp_path: Path) -> AsyncIterator[Live]:
    port = free_port()
    config = EmulatorConfig(
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
        min_timeout=0,
        rate_limit=None,
        auto_bind=True,
    )
    server = EmulatorServer(config).start()
    portal = Portal(server.base_url)
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",
    )
    try:
        async with bridge_in_process(env) as bridge:
            await next(iter(bridge.service.sessions.values())).drainer.idle.wait()
            app = await portal.app()
            yield Live("127.0.0.1", port, portal, app, bridge.service)
    finally:
        await portal.close()
        server.stop()


async def _raw(
    live: Live, head: bytes, body_parts: list[bytes], *, gap: float = 0.0, close: bool = False
) -> bytes:
    """Send a request piece by piece; answer the raw response (b"" if the server said nothing)."""
    reader, writer = await asyncio.open_connection(live.host, live.port)
    try:
        try:
            writer.write(head)
            await writer.drain()
            for part in body_parts:
                if gap:
                    await asyncio.sleep(gap)  # a slow sender is the subject
                writer.write(part)
                await writer.drain()
            if close:
                writer.write_eof()
        except OSError:
            pass  # the server answered early and hung up: its answer is still to be read
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except OSError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _head(content_type: str, length: int | str, extra: str = "") -> bytes:
    return (
        f"POST /bitrix24/events HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode("latin-1")


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw.split(b" ", 2)[1])


async def test_hostile_requests_over_a_socket(live: Live) -> None:
    before = await live.portal.calls()
    member, token = live.app["member_id"], live.app["application_token"]
    unauth = f"event=ONOFFLINEEVENT&auth[member_id]={member}&auth[application_token]={'0' * 32}"

    def plain(name: str, content_type: str, body: bytes, status: int) -> tuple[object, ...]:
        return (name, _head(content_type, len(body)), [body], {status})

    deep = ("a" + "[x]" * 40 + "=1").encode()
    cases = [
        plain("invalid utf-8", FORM, b"event=\xff\xfe\xfd\xfc\xfb", 400),
        plain("invalid utf-8 escaped", FORM, b"event=ONOFFLINEEVENT&a=%ff%fe", 401),
        plain("repeated keys", FORM, "&".join(["a[]=1"] * 1001).encode(), 400),
        plain("repeated event", FORM, b"event=ONOFFLINEEVENT&" * 100 + b"event=", 400),
        plain("huge key", FORM, b"k" * 60_000 + b"=1", 400),
        plain("deep key", FORM, deep, 400),
        plain("wrong type", "text/xml", b"<a/>x", 415),
        plain("no type", "", b"event", 415),
        plain("unauthenticated", FORM, unauth.encode(), 401),
        plain("json array", "application/json", b"[1, 2]", 400),
        plain("json nested", "application/json", b"[" * 60_000, 400),
        ("declared too large", _head(FORM, 10_000_000), [b"a=1"], {413}),
        ("chunked too large", _chunked_head(), [_chunk(b"a" * 40_000)] * 2, {413}),
        ("bad length", _head(FORM, "12x"), [b"event=x"], {400}),
    ]
    for name, head, parts, expected in cases:
        assert isinstance(head, bytes)
        assert isinstance(parts, list)
        assert isinstance(expected, set)
        raw = await _raw(live, head, parts)
        assert raw, name
        assert _status(raw) in expected, (name, raw[:200])
        assert token.encode() not in raw

    # A slow body (a byte now and then) is answered properly, and does not block others.
    slow = asyncio.create_task(
        _raw(live, _head(FORM, len(unauth)), [bytes([b]) for b in unauth.encode()][:40], gap=0.02)
    )
    for _ in range(5):
        raw = await _raw(live, _head(FORM, len(unauth)), [unauth.encode()])
        assert _status(raw) == 401
    assert not slow.done(), "the slow request should still be in progress"
    slow.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await slow

    # Truncated: more declared than sent, then the client goes away.
    for sent in (0, 1, 100):
        raw = await _raw(live, _head(FORM, 5000), [b"a" * sent], close=True)
        assert raw == b"" or _status(raw) == 400, raw[:200]
    with socket.create_connection((live.host, live.port), timeout=5) as sock:
        sock.sendall(_head(FORM, 5000) + b"event=")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # Still alive and still honest about what it is.
    async with httpx.AsyncClient(base_url=f"http://{live.host}:{live.port}") as client:
        assert (await client.get("/livez")).status_code == 200
        ok = f"event=ONOFFLINEEVENT&auth[member_id]={member}&auth[application_token]={token}"
        answer = await client.post("/bitrix24/events", content=ok, headers={"content-type": FORM})
        assert answer.status_code == 200

        # The genuine one drains (and so calls the portal); none of the others did.
        async def drained() -> bool:
            return await live.portal.calls() != before

        await until(drained, "the genuine notification to start a drain", timeout=10)


async def test_no_unauthenticated_request_over_a_socket_calls_the_portal(live: Live) -> None:
    before = await live.portal.calls()
    member = live.app["member_id"]
    drainer = live.service.sessions[member].drainer
    passes = drainer.passes
    bodies = [
        f"event=ONOFFLINEEVENT&auth[member_id]={member}&auth[application_token]={'0' * 32}",
        "event=ONOFFLINEEVENT&auth[member_id]=&auth[application_token]=",
        f"event=ONAPPUNINSTALL&auth[member_id]={member}",
        f"event=onofflineevent&auth[member_id]={member}&auth[application_token][]=x",
        f"event[]=ONOFFLINEEVENT&auth[member_id]={member}",
    ]
    async with httpx.AsyncClient(base_url=f"http://{live.host}:{live.port}") as client:
        for body in bodies * 20:
            response = await client.post(
                "/bitrix24/events", content=body, headers={"content-type": FORM}
            )
            assert response.status_code in (400, 401), body
    # The drainer was never woken (a wake-up happens inside the request, so this is final)...
    assert drainer.idle.is_set()
    assert (drainer.passes, drainer._pending_ts, drainer._untimed) == (passes, None, False)
    # ...and the portal saw no call.
    assert await live.portal.calls() == before


def _chunked_head() -> bytes:
    return (
        "POST /bitrix24/events HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n"
        f"Content-Type: {FORM}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"
