"""Diadoc's rotating refresh token across failed writes, kills and cancellations.

A rotated refresh token is the only live one: the provider has forgotten the old one. These tests
fail the state (a trigger, added over a second connection, aborts the write; on the SQLite file
and on PostgreSQL) or cancel the caller at the worst moment, and prove the chain survives: a
later request and a restarted process both still authenticate, and the provider never sees a
dead token.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bridge.amqp.publisher import AmqpPublisher
from bridge.core.errors import StateError
from bridge.diadoc.auth import AUTH_SOURCE, BOOTSTRAP_KEY, REFRESH_KEY
from bridge.diadoc.metrics import DiadocMetrics
from bridge.diadoc.source import DocflowFeed, FeedOptions
from bridge.diadoc.wiring import PolledDrainer
from bridge.emulators.diadoc import DiadocEmulatorServer
from bridge.metrics import Metrics
from bridge.state import State
from tests.diadoc.harness import REQUEST, emulated_client
from tests.harness import until
from tests.plugins.broker import AmqpNamespace
from tests.state_backends import Backend
from tests.waiting import holds


async def fail_writes(backend: Backend, key: str | None = None) -> None:
    """From now on, writing Diadoc's auth rows (or only ``key``) aborts, as a full disk would."""
    await backend.refuse("cursors", key, message="disk full")


async def restart_works(
    diadoc: DiadocEmulatorServer, backend: Backend, bootstrap: str | None
) -> None:
    """A new process on the same state (and the same, now dead, bootstrap variable)."""
    refused = diadoc.model.refused_refreshes
    state = await backend.open()
    try:
        async with httpx.AsyncClient() as http:
            # PgState mirrors State method for method; the Diadoc classes name the SQLite one.
            client = emulated_client(diadoc, state, http, bootstrap)  # type: ignore[arg-type]
            await client.docflow_events("box-a", REQUEST)
    finally:
        await state.close()
    assert diadoc.model.refused_refreshes == refused


async def test_a_rotated_token_that_could_not_be_stored_is_kept_and_stored_before_its_use(
    diadoc: DiadocEmulatorServer, state: State, state_backend: Backend
) -> None:
    bootstrap = diadoc.model.issue_refresh_token()
    await fail_writes(state_backend)
    async with httpx.AsyncClient() as http:
        client = emulated_client(diadoc, state, http, bootstrap)
        with pytest.raises(StateError, match="disk full"):
            await client.docflow_events("box-a", REQUEST)
        assert diadoc.model.refreshes == 1  # the provider rotated: the bootstrap token is dead
        assert diadoc.model.counters()["requests"] == 0  # and nothing was asked with its access
        with pytest.raises(StateError):
            await client.docflow_events("box-a", REQUEST)  # still no disk: still not used
        assert diadoc.model.counters()["requests"] == 0
        await state_backend.allow()
        await client.docflow_events("box-a", REQUEST)
    # Stored first, then used: no second exchange was needed, none was refused.
    assert diadoc.model.refreshes == 1
    assert diadoc.model.refused_refreshes == 0
    assert await state.source_secret(AUTH_SOURCE, REFRESH_KEY) not in (None, bootstrap)
    await restart_works(diadoc, state_backend, bootstrap)


async def test_the_token_and_the_bootstrap_fingerprint_are_written_together(
    diadoc: DiadocEmulatorServer, state: State, state_backend: Backend
) -> None:
    bootstrap = diadoc.model.issue_refresh_token()
    await fail_writes(state_backend, BOOTSTRAP_KEY)  # the second of the two rows fails
    async with httpx.AsyncClient() as http:
        client = emulated_client(diadoc, state, http, bootstrap)
        with pytest.raises(StateError):
            await client.docflow_events("box-a", REQUEST)
        # Both or neither: a stored token without its fingerprint would make the next start
        # present the dead bootstrap token instead.
        stored = await state.source_secret(AUTH_SOURCE, REFRESH_KEY)
        used = await state.cursor(AUTH_SOURCE, BOOTSTRAP_KEY)
        assert (stored, used) == (None, None)
        await state_backend.allow()
        await client.docflow_events("box-a", REQUEST)
    assert await state.cursor(AUTH_SOURCE, BOOTSTRAP_KEY) is not None
    await restart_works(diadoc, state_backend, bootstrap)


class HoldRotation(httpx.AsyncBaseTransport):
    """Passes requests through, but holds the token endpoint's answer after the provider rotated
    the refresh token: the worst moment for a cancellation."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.rotated = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.url.path.endswith("/connect/token"):
            body = await response.aread()
            self.rotated.set()
            await self.release.wait()
            return httpx.Response(response.status_code, headers=response.headers, content=body)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_pass_cancelled_after_the_rotation_still_stores_the_token(
    diadoc: DiadocEmulatorServer, state: State, state_backend: Backend, amqp_ns: AmqpNamespace
) -> None:
    bootstrap = diadoc.model.issue_refresh_token()
    hold = HoldRotation()
    publisher = AmqpPublisher(amqp_ns.url, unrouted_exchange=amqp_ns.unrouted_exchange)
    await publisher.start()
    try:
        async with httpx.AsyncClient(transport=hold) as http:
            client = emulated_client(diadoc, state, http, bootstrap)
            feed = DocflowFeed(
                "box-a",
                client=client,
                state=state,
                publisher=publisher,
                metrics=DiadocMetrics(CollectorRegistry()),
                options=FeedOptions(exchange=f"{amqp_ns.prefix}.diadoc"),
            )
            drainer = PolledDrainer(feed, metrics=Metrics(), interval=60)
            drainer.start()
            await asyncio.wait_for(hold.rotated.wait(), 10)
            # Shutdown: the pass is cancelled while the rotated token is on its way to the disk.
            stopping = asyncio.create_task(drainer.stop(0))
            await until(holds(lambda: not drainer.alive), "the pass to be cancelled", timeout=10)
            assert not stopping.done()  # close waits for the renewal, not only for the pass
            hold.release.set()
            await asyncio.wait_for(stopping, 10)
            assert diadoc.model.refreshes == 1
            assert await state.source_secret(AUTH_SOURCE, REFRESH_KEY) not in (None, bootstrap)
    finally:
        await publisher.close()
    await restart_works(diadoc, state_backend, bootstrap)
