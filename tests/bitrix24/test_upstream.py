"""The REST client's rules, against a scripted portal (an httpx transport, no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.upstream import PortalClient
from bridge.core.errors import OutcomeUnknown, PortalStopped, StateError, TokenError, TransientError
from bridge.metrics import Metrics
from bridge.state import Portal

PORTAL = Portal(
    member_id="m1",
    domain="acme.example",
    client_endpoint="https://acme.example/rest/",
    access_token="old-access",
    refresh_token="old-refresh",
    application_token="app",
)


class Scripted:
    """A portal and OAuth server whose answers the test writes."""

    def __init__(self, rest: Callable[[str, dict[str, object]], httpx.Response]) -> None:
        self.rest = rest
        self.refreshes = 0
        self.calls: list[tuple[str, str]] = []
        self.valid_access = "new-access"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        if url.path.startswith("/oauth/token"):
            self.refreshes += 1
            query = parse_qs(url.query)
            assert query["refresh_token"] == ["old-refresh"]
            return httpx.Response(
                200,
                json={
                    "access_token": "new-access",
                    "refresh_token": "new-refresh",
                    "expires_in": 3600,
                    "member_id": "m1",
                    "client_endpoint": "https://acme.example/rest/",
                    "server_endpoint": "https://oauth.example/rest/",
                    "domain": "oauth.example",
                },
            )
        body = json.loads(request.content)
        method = url.path.removeprefix("/rest/").removesuffix(".json")
        self.calls.append((method, str(body.get("auth"))))
        return self.rest(method, body)


def make_client(scripted: Scripted, saved: list[Portal], fail_saves: int = 0) -> PortalClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(scripted))
    oauth = OAuthClient(http, oauth_url="https://oauth.example", client_id="c", client_secret="s")
    failures = [fail_saves]

    async def save(portal: Portal) -> None:
        if failures[0]:
            failures[0] -= 1
            raise StateError("state file write failed: disk full")
        saved.append(portal)

    return PortalClient(
        PORTAL,
        http=http,
        oauth=oauth,
        save=save,
        metrics=Metrics(),
        rate_limit=1000,
        rate_burst=1000,
    )


def token_checked(scripted: Scripted) -> Callable[[str, dict[str, object]], httpx.Response]:
    def rest(method: str, body: dict[str, object]) -> httpx.Response:
        if body.get("auth") != scripted.valid_access:
            return httpx.Response(401, json={"error": "expired_token", "error_description": "x"})
        return httpx.Response(200, json={"result": {"ok": method}, "time": {"start": 1.0}})

    return rest


async def test_concurrent_expired_calls_refresh_once_and_persist_first() -> None:
    scripted = Scripted(lambda m, b: httpx.Response(500))
    scripted.rest = token_checked(scripted)
    saved: list[Portal] = []
    client = make_client(scripted, saved)
    answers = await asyncio.gather(
        *(client.call("event.get", {}, idempotent=True) for _ in range(10))
    )
    assert [a.result for a in answers] == [{"ok": "event.get"}] * 10
    assert scripted.refreshes == 1
    assert [p.refresh_token for p in saved] == ["new-refresh"]
    assert client.portal.access_token == "new-access"


async def test_refreshed_pair_that_cannot_be_saved_is_kept_and_saved_before_the_next_call() -> None:
    scripted = Scripted(lambda m, b: httpx.Response(500))
    scripted.rest = token_checked(scripted)
    saved: list[Portal] = []
    client = make_client(scripted, saved, fail_saves=1)
    with pytest.raises(StateError):
        await client.call("event.get", {}, idempotent=True)
    assert client.portal.refresh_token == "new-refresh"  # not lost: the old one is dead
    answer = await client.call("event.get", {}, idempotent=True)
    assert answer.result == {"ok": "event.get"}
    assert [p.refresh_token for p in saved] == ["new-refresh"]
    assert scripted.refreshes == 1


async def test_a_refused_refresh_is_a_token_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if "/oauth/token" in str(request.url):
            return httpx.Response(400, json={"error": "invalid_grant"})
        return httpx.Response(401, json={"error": "expired_token"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    oauth = OAuthClient(http, oauth_url="https://oauth.example", client_id="c", client_secret="s")

    async def save(portal: Portal) -> None:
        raise AssertionError("nothing to save")

    client = PortalClient(
        PORTAL,
        http=http,
        oauth=oauth,
        save=save,
        metrics=Metrics(),
        rate_limit=1000,
        rate_burst=1000,
    )
    with pytest.raises(TokenError, match="invalid_grant"):
        await client.call("event.get", {}, idempotent=True)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("WRONG_LICENSE", PortalStopped),
        ("ACCESS_DENIED", PortalStopped),
        ("OVERLOAD_LIMIT", PortalStopped),
        ("ERROR_ARGUMENT", PortalStopped),
        ("OPERATION_TIME_LIMIT", TransientError),
    ],
)
async def test_error_codes_map_to_their_action(error: str, kind: type[Exception]) -> None:
    scripted = Scripted(lambda m, b: httpx.Response(403, json={"error": error}))
    client = make_client(scripted, [])
    with pytest.raises(kind):
        await client.call("event.offline.get", {}, idempotent=True)
    assert len(scripted.calls) == 1  # none of these is retried on the spot


async def test_operating_limit_waits_until_reset() -> None:
    scripted = Scripted(
        lambda m, b: httpx.Response(
            429, json={"error": "OPERATION_TIME_LIMIT", "time": {"operating_reset_at": 1e12}}
        )
    )
    client = make_client(scripted, [])
    with pytest.raises(TransientError) as caught:
        await client.call("event.offline.get", {}, idempotent=True)
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 10


async def test_rate_limited_calls_are_retried_even_when_not_idempotent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter(
        [httpx.Response(503, json={"error": "QUERY_LIMIT_EXCEEDED"})] * 2
        + [httpx.Response(200, json={"result": {"process_id": "p"}, "time": {}})]
    )
    scripted = Scripted(lambda m, b: next(answers))
    client = make_client(scripted, [])
    client._max_rate_retries = 3
    monkeypatch.setattr("bridge.bitrix24.upstream.backoff", lambda *_a, **_kw: 0.0)
    answer = await client.call("event.offline.get", {"clear": 0}, idempotent=False)
    assert answer.result == {"process_id": "p"}
    assert len(scripted.calls) == 3


async def test_server_fault_on_a_reservation_is_not_retried() -> None:
    scripted = Scripted(lambda m, b: httpx.Response(502, text="<html>Bad Gateway</html>"))
    client = make_client(scripted, [])
    with pytest.raises(OutcomeUnknown):
        await client.call("event.offline.get", {"clear": 0}, idempotent=False)
    assert len(scripted.calls) == 1


async def test_domain_change_is_followed_and_stored() -> None:
    def rest(method: str, body: dict[str, object]) -> httpx.Response:
        return httpx.Response(200, json={"result": True, "time": {}})

    def transport(request: httpx.Request) -> httpx.Response:
        if request.url.host == "acme.example":
            return httpx.Response(
                302, headers={"location": "https://new.example/rest/app.info.json"}
            )
        return rest("", {})

    http = httpx.AsyncClient(transport=httpx.MockTransport(transport))
    oauth = OAuthClient(http, oauth_url="https://oauth.example", client_id="c", client_secret="s")
    saved: list[Portal] = []

    async def save(portal: Portal) -> None:
        saved.append(portal)

    client = PortalClient(
        PORTAL,
        http=http,
        oauth=oauth,
        save=save,
        metrics=Metrics(),
        rate_limit=1000,
        rate_burst=1000,
    )
    answer = await client.call("app.info", {}, idempotent=True)
    assert answer.result is True
    assert client.portal.client_endpoint == "https://new.example/rest/"
    assert [p.domain for p in saved] == ["new.example"]
