"""The Diadoc client against the emulator: token rotation, re-auth, back-off, stopping errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bridge.core.errors import PortalStopped, TokenError, TransientError
from bridge.diadoc.auth import AUTH_SOURCE, REFRESH_KEY
from bridge.emulators.diadoc import DiadocEmulatorServer, FaultRule
from bridge.state import State
from tests.diadoc.harness import REQUEST, emulated_client
from tests.state_backends import Backend


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_rotated_refresh_token_is_stored_and_survives_a_restart(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    bootstrap = diadoc.model.issue_refresh_token()
    client = emulated_client(diadoc, state, http, bootstrap)
    await client.docflow_events("box-a", REQUEST)
    stored = await state.source_secret(AUTH_SOURCE, REFRESH_KEY)
    assert stored is not None
    assert stored != bootstrap  # rotated, and on disk

    # A new process with the same (now dead) bootstrap variable uses the stored token.
    again = emulated_client(diadoc, state, http, bootstrap)
    await again.docflow_events("box-a", REQUEST)
    assert diadoc.model.refused_refreshes == 0
    assert await state.source_secret(AUTH_SOURCE, REFRESH_KEY) != stored

    # An operator who sets a new bootstrap token gets it used.
    fresh = diadoc.model.issue_refresh_token()
    third = emulated_client(diadoc, state, http, fresh)
    await third.docflow_events("box-a", REQUEST)
    assert diadoc.model.refused_refreshes == 0


async def test_concurrent_401s_refresh_once(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    await client.docflow_events("box-a", REQUEST)
    diadoc.model.expire_tokens()
    await asyncio.gather(*(client.docflow_events("box-a", REQUEST) for _ in range(5)))
    assert client.auth.refreshes == 2  # the first token, then one renewal for all five
    assert diadoc.model.refused_refreshes == 0


async def test_401_retries_the_same_page(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    diadoc.model.add_events("box-a", count=3)
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    first = await client.docflow_events("box-a", {**REQUEST, "Limit": 2})
    after = first.events[-1]["IndexKey"]
    diadoc.model.expire_tokens()
    second = await client.docflow_events("box-a", {**REQUEST, "Limit": 2, "AfterIndexKey": after})
    assert len(second.events) == 1
    tail = diadoc.model.requests[-2:]
    assert [(r["status"], r["after"]) for r in tail] == [(401, after), (200, after)]


async def test_429_and_5xx_back_off_then_succeed(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults(
        [FaultRule(status=429, count=2, retry_after=0), FaultRule(status=503, count=1)]
    )
    page = await client.docflow_events("box-a", REQUEST)
    assert page.events == ()
    assert diadoc.model.counters()["statuses"] == {"200": 1, "429": 2, "503": 1}


async def test_persistent_5xx_ends_as_transient_error(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults([FaultRule(status=500, count=50, error_code="Internal")])
    with pytest.raises(TransientError) as info:
        await client.docflow_events("box-a", REQUEST)
    assert "X-Diadoc-ErrorCode: Internal" in str(info.value)


@pytest.mark.parametrize("status", [400, 402, 403, 404, 405, 415])
async def test_configuration_errors_stop(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient, status: int
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults([FaultRule(status=status, error_code="Subscription.Expired")])
    with pytest.raises(PortalStopped) as info:
        await client.docflow_events("box-a", REQUEST)
    assert f"HTTP {status}" in str(info.value)
    assert "Subscription.Expired" in str(info.value)
    assert diadoc.model.counters()["requests"] == 1  # never retried


async def test_refused_credentials_are_a_token_error_without_secrets(
    diadoc: DiadocEmulatorServer,
    state: State,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bootstrap = diadoc.model.issue_refresh_token()
    client = emulated_client(diadoc, state, http, bootstrap, secret="wrong-secret-value")
    with pytest.raises(TokenError) as info:
        await client.docflow_events("box-a", REQUEST)
    for text in (str(info.value), caplog.text):
        assert bootstrap not in text
        assert "wrong-secret-value" not in text


async def test_without_any_refresh_token_says_which_variable(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = emulated_client(diadoc, state, http, None)
    with pytest.raises(TokenError, match="BRIDGE_DIADOC_REFRESH_TOKEN"):
        await client.docflow_events("box-a", REQUEST)


async def test_stored_refresh_token_is_encrypted_with_the_state_key(
    diadoc: DiadocEmulatorServer, state_backend: Backend, http: httpx.AsyncClient
) -> None:
    from cryptography.fernet import Fernet

    state = await state_backend.open([Fernet.generate_key()])
    try:
        # PgState mirrors State method for method
        client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())  # type: ignore[arg-type]
        await client.docflow_events("box-a", REQUEST)
        raw = await state.cursor(AUTH_SOURCE, REFRESH_KEY)
        plain = await state.source_secret(AUTH_SOURCE, REFRESH_KEY)
    finally:
        await state.close()
    assert raw is not None
    assert plain is not None
    assert raw.startswith("fernet:")
    assert plain not in raw


async def test_v5_by_default_and_the_version_is_a_setting(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    diadoc.model.add_events("box-a", document_type="Invoice")
    current = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    page = await current.docflow_events("box-a", {**REQUEST, "PopulateDocuments": True})
    assert page.events[0]["Document"]["DocumentInfo"]["FullVersion"]["TypeNamedId"] == "Invoice"
    older = emulated_client(diadoc, state, http, None, version="V4")
    await older.docflow_events("box-a", REQUEST)
    assert [r["version"] for r in diadoc.model.requests] == [5, 4]


async def test_a_sunset_header_is_logged_and_counted(
    diadoc: DiadocEmulatorServer,
    state: State,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    client = emulated_client(
        diadoc, state, http, diadoc.model.issue_refresh_token(), version="V3", registry=registry
    )
    for _ in range(2):
        await client.docflow_events("box-a", REQUEST)
    labels = {"version": "V3", "header": "sunset"}
    notices = registry.get_sample_value(
        "bitrix24_bridge_diadoc_api_deprecation_notices_total", labels
    )
    assert notices == 2
    sunset = registry.get_sample_value(
        "bitrix24_bridge_diadoc_api_sunset_timestamp_seconds", {"version": "V3"}
    )
    assert sunset == 1806710400  # 3 April 2027
    assert [r.getMessage() for r in caplog.records].count(
        "Diadoc announces the retirement of the API version in use; set "
        "BRIDGE_DIADOC_API_VERSION to a current one before that date"
    ) == 1


@pytest.mark.parametrize("retry_after", [120, "Wed, 21 Oct 2099 07:28:00 GMT"])
async def test_a_long_retry_after_goes_to_the_box_back_off(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient, retry_after: str | int
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults([FaultRule(status=429, count=5, retry_after=retry_after)])
    with pytest.raises(TransientError) as info:
        await client.docflow_events("box-a", REQUEST)
    # Not asked again before the server is ready: the box's back-off waits instead (at most an
    # hour, whatever the date says).
    assert diadoc.model.counters()["statuses"] == {"429": 1}
    assert info.value.retry_after == (120 if retry_after == 120 else 3600)


async def test_an_unknown_version_stops_with_a_reason(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token(), version="V9")
    with pytest.raises(PortalStopped) as info:
        await client.docflow_events("box-a", REQUEST)
    assert "HTTP 404" in str(info.value)
    assert "BRIDGE_DIADOC_API_VERSION" in str(info.value)


async def test_403_points_at_the_department_setting(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    diadoc.model.add_box("box-d", department="dep-1")
    client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    with pytest.raises(PortalStopped, match="BRIDGE_DIADOC_DEPARTMENT_ID"):
        await client.docflow_events("box-d", REQUEST)
    page = await client.docflow_events("box-d", {**REQUEST, "DepartmentId": "dep-1"})
    assert page.events == ()


async def test_a_protobuf_answer_stops_the_box_with_a_clear_reason(
    diadoc: DiadocEmulatorServer, state: State
) -> None:
    async def forget_accept(request: httpx.Request) -> None:
        del request.headers["Accept"]  # a client that forgets to ask for JSON

    async with httpx.AsyncClient(event_hooks={"request": [forget_accept]}) as http:
        client = emulated_client(diadoc, state, http, diadoc.model.issue_refresh_token())
        with pytest.raises(PortalStopped, match="Accept: application/json"):
            await client.docflow_events("box-a", REQUEST)
