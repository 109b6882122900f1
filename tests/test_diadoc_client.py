"""The Diadoc client against the emulator: token rotation, re-auth, back-off, stopping errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bridge.diadoc.auth import AUTH_SOURCE, REFRESH_KEY, DiadocAuth
from bridge.diadoc.client import DiadocClient
from bridge.diadoc.emulator import DiadocEmulator, DiadocEmulatorServer, FaultRule
from bridge.diadoc.metrics import DiadocMetrics
from bridge.diadoc.ticks import timestamp
from bridge.errors import PortalStopped, TokenError, TransientError
from bridge.state import State

REQUEST: dict[str, Any] = {
    "Filter": {"FromTimestamp": {"Ticks": 0}, "ToTimestamp": timestamp(4e9)},
    "Limit": 100,
}


@pytest.fixture
def diadoc() -> Iterator[DiadocEmulatorServer]:
    with DiadocEmulatorServer(DiadocEmulator(("box-a",))) as server:
        yield server


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    state = await State.open(str(tmp_path / "state.sqlite3"))
    yield state
    await state.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def make_client(
    diadoc: DiadocEmulatorServer,
    state: State,
    http: httpx.AsyncClient,
    bootstrap: str | None,
    *,
    secret: str | None = None,
) -> DiadocClient:
    metrics = DiadocMetrics(CollectorRegistry())
    auth = DiadocAuth(
        http,
        token_url=diadoc.token_url,
        client_id=diadoc.model.client_id,
        client_secret=secret or diadoc.model.client_secret,
        bootstrap_refresh_token=bootstrap,
        state=state,
        metrics=metrics,
    )
    return DiadocClient(
        http, auth, api_url=diadoc.api_url, metrics=metrics, backoff_base=0.01, backoff_cap=0.05
    )


async def test_rotated_refresh_token_is_stored_and_survives_a_restart(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    bootstrap = diadoc.model.issue_refresh_token()
    client = make_client(diadoc, state, http, bootstrap)
    await client.docflow_events("box-a", REQUEST)
    stored = await state.source_secret(AUTH_SOURCE, REFRESH_KEY)
    assert stored is not None
    assert stored != bootstrap  # rotated, and on disk

    # A new process with the same (now dead) bootstrap variable uses the stored token.
    again = make_client(diadoc, state, http, bootstrap)
    await again.docflow_events("box-a", REQUEST)
    assert diadoc.model.refused_refreshes == 0
    assert await state.source_secret(AUTH_SOURCE, REFRESH_KEY) != stored

    # An operator who sets a new bootstrap token gets it used.
    fresh = diadoc.model.issue_refresh_token()
    third = make_client(diadoc, state, http, fresh)
    await third.docflow_events("box-a", REQUEST)
    assert diadoc.model.refused_refreshes == 0


async def test_concurrent_401s_refresh_once(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    await client.docflow_events("box-a", REQUEST)
    diadoc.model.expire_tokens()
    await asyncio.gather(*(client.docflow_events("box-a", REQUEST) for _ in range(5)))
    assert client.auth.refreshes == 2  # the first token, then one renewal for all five
    assert diadoc.model.refused_refreshes == 0


async def test_401_retries_the_same_page(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    diadoc.model.add_events("box-a", count=3)
    client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
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
    client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults(
        [FaultRule(status=429, count=2, retry_after=0), FaultRule(status=503, count=1)]
    )
    page = await client.docflow_events("box-a", REQUEST)
    assert page.events == ()
    assert diadoc.model.counters()["statuses"] == {"200": 1, "429": 2, "503": 1}


async def test_persistent_5xx_ends_as_transient_error(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
    diadoc.model.add_faults([FaultRule(status=500, count=50, error_code="Internal")])
    with pytest.raises(TransientError) as info:
        await client.docflow_events("box-a", REQUEST)
    assert "X-Diadoc-ErrorCode: Internal" in str(info.value)


@pytest.mark.parametrize("status", [400, 402, 403, 405])
async def test_configuration_errors_stop(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient, status: int
) -> None:
    client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
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
    client = make_client(diadoc, state, http, bootstrap, secret="wrong-secret-value")
    with pytest.raises(TokenError) as info:
        await client.docflow_events("box-a", REQUEST)
    for text in (str(info.value), caplog.text):
        assert bootstrap not in text
        assert "wrong-secret-value" not in text


async def test_without_any_refresh_token_says_which_variable(
    diadoc: DiadocEmulatorServer, state: State, http: httpx.AsyncClient
) -> None:
    client = make_client(diadoc, state, http, None)
    with pytest.raises(TokenError, match="BRIDGE_DIADOC_REFRESH_TOKEN"):
        await client.docflow_events("box-a", REQUEST)


async def test_stored_refresh_token_is_encrypted_with_the_state_key(
    diadoc: DiadocEmulatorServer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    from cryptography.fernet import Fernet

    path = str(tmp_path / "sealed.sqlite3")
    state = await State.open(path, [Fernet.generate_key()])
    try:
        client = make_client(diadoc, state, http, diadoc.model.issue_refresh_token())
        await client.docflow_events("box-a", REQUEST)
        raw = await state.cursor(AUTH_SOURCE, REFRESH_KEY)
        plain = await state.source_secret(AUTH_SOURCE, REFRESH_KEY)
    finally:
        await state.close()
    assert raw is not None
    assert plain is not None
    assert raw.startswith("fernet:")
    assert plain not in raw
