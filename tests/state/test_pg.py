"""What only the PostgreSQL state does: epoch-checked writes and token refresh across replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import psycopg
import pytest

from bridge.bitrix24.oauth import OAuthClient
from bridge.core.errors import LeaseLost, TokenError
from bridge.emulators.bitrix24 import EmulatorServer
from bridge.scaling.leases import LeaseManager
from bridge.state import Portal
from bridge.state.pg import PgState
from tests.harness import until
from tests.state.test_state import proof


@pytest.fixture
async def state(pg_url: str) -> AsyncIterator[PgState]:
    state = await PgState.open(pg_url)
    yield state
    await state.close()


@pytest.fixture
async def manager(pg_url: str) -> AsyncIterator[LeaseManager]:
    manager = LeaseManager(pg_url, f"r-{uuid.uuid4().hex[:6]}", shards=2, ttl=30, renew_every=1)
    await manager.start()
    yield manager
    await manager.halt()


async def test_fenced_writes_apply_while_the_lease_holds(
    state: PgState, manager: LeaseManager
) -> None:
    view = state.fenced(manager.fence(1))
    await view.journal_add("m1", "", ["p1"])
    await view.set_cursor("diadoc", "box", "k1")
    assert await state.journal("m1", "") == ["p1"]
    assert await state.cursor("diadoc", "box") == "k1"


async def test_fenced_writes_are_refused_after_a_takeover_and_change_nothing(
    state: PgState, manager: LeaseManager, pg_url: str
) -> None:
    view = state.fenced(manager.fence(1))
    await view.journal_add("m1", "", ["p1"])
    # Another replica takes shard 1 over in the database while this one still believes it
    # holds it (its local deadline is far ahead): only the check in the transaction sees it.
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
        await other.execute("UPDATE leases SET holder = 'other', epoch = epoch + 1 WHERE shard = 1")
    assert manager.owns(1)
    for write in (
        view.journal_add("m1", "", ["p2"]),
        view.journal_remove("m1", "", ["p1"]),
        view.journal_confirm("m1", "", {"p1": await proof("e1")}),
        view.set_cursor("diadoc", "box", "k2"),
        view.set_source_values("diadoc", {"a": "1", "b": "2"}),
        view.seen_add("diadoc", "box", ["x"], keep=10),
    ):
        with pytest.raises(LeaseLost, match="shard 1"):
            await write
    assert [e.process_id for e in await state.journal_entries("m1", "")] == ["p1"]
    assert (await state.journal_entries("m1", ""))[0].confirmed == frozenset()
    assert await state.cursor("diadoc", "box") is None
    assert await state.cursor("diadoc", "a") is None
    assert await state.seen_filter("diadoc", "box", ["x"]) == set()
    assert view.write_failure is None  # a lost lease is not a broken database
    # The unfenced state (and shard 0's fence) still write.
    await state.fenced(manager.fence(0)).journal_add("m1", "", ["p3"])
    assert await state.journal("m1", "") == ["p1", "p3"]


async def test_a_fence_past_its_deadline_refuses_before_asking_the_database(
    state: PgState, pg_url: str
) -> None:
    now = [100.0]
    manager = LeaseManager(pg_url, "clocked", shards=1, ttl=5, renew_every=1, clock=lambda: now[0])
    await manager.start()
    try:
        view = state.fenced(manager.fence(0))
        now[0] += 5  # the deadline, on this replica's own clock; the database still says "yours"
        assert not manager.owns(0)
        with pytest.raises(LeaseLost, match="no longer held"):
            await view.journal_add("m1", "", ["p1"])
        assert await state.journal("m1", "") == []
    finally:
        await manager.halt()


# -- token refresh under the row lock ---------------------------------------------------------


class Presented:
    """Every refresh token shown to the OAuth server, and what it answered."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.refused: list[str] = []


def exchange_with(
    oauth: OAuthClient, presented: Presented, before: Callable[[], Awaitable[None]] | None = None
) -> Callable[[Portal], Awaitable[Portal]]:
    async def exchange(portal: Portal) -> Portal:
        if before is not None:
            await before()
        presented.tokens.append(portal.refresh_token)
        try:
            grant = await oauth.refresh(portal.refresh_token)
        except TokenError as exc:
            presented.refused.append(exc.code)
            raise
        return portal.with_tokens(grant.access_token, grant.refresh_token, grant.expires_at)

    return exchange


async def waiting_on_a_lock(url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%FOR UPDATE%%'"
        )
        row = await cur.fetchone()
        return row is not None and row[0] > 0


@pytest.fixture
async def oauth_portal(
    emulator: EmulatorServer, pg_url: str
) -> AsyncIterator[tuple[OAuthClient, Portal]]:
    async with httpx.AsyncClient(base_url=emulator.base_url) as http:
        app: dict[str, Any] = (await http.get("/_emulator/app")).json()
        oauth = OAuthClient(
            http,
            oauth_url=app["oauth_url"],
            client_id=app["client_id"],
            client_secret=app["client_secret"],
        )
        portal = Portal(
            member_id=app["member_id"],
            domain=app["domain"],
            client_endpoint=app["client_endpoint"],
            access_token="expired-access",
            refresh_token=app["refresh_token"],
        )
        yield oauth, portal


async def test_two_replicas_refreshing_at_once_present_the_refresh_token_once(
    oauth_portal: tuple[OAuthClient, Portal], pg_url: str
) -> None:
    oauth, portal = oauth_portal
    a, b = await PgState.open(pg_url), await PgState.open(pg_url)
    try:
        await a.save_portal(portal)
        presented = Presented()

        async def once_the_other_waits() -> None:
            # Hold the row lock until the other replica is queued behind it.
            await until(lambda: waiting_on_a_lock(pg_url), "the second refresher to wait", 20)

        first, second = await asyncio.gather(
            a.refresh_portal(
                portal.member_id,
                "expired-access",
                exchange_with(oauth, presented, once_the_other_waits),
            ),
            b.refresh_portal(portal.member_id, "expired-access", exchange_with(oauth, presented)),
        )
        assert presented.tokens == [portal.refresh_token]  # once, by one replica
        assert presented.refused == []
        assert sorted([first.exchanged, second.exchanged]) == [False, True]
        assert first.portal == second.portal  # the loser adopted the winner's pair
        assert await b.portal(portal.member_id) == first.portal
        # The chain goes on: the stored token is the live one.
        third = await b.refresh_portal(
            portal.member_id, first.portal.access_token, exchange_with(oauth, presented)
        )
        assert third.exchanged
        assert presented.tokens == [portal.refresh_token, first.portal.refresh_token]
        assert presented.refused == []
    finally:
        await a.close()
        await b.close()


async def test_without_the_lock_the_second_refresher_is_refused(
    oauth_portal: tuple[OAuthClient, Portal],
) -> None:
    # The contrast to the test above: the emulator rotates strictly, so the check can fail.
    oauth, portal = oauth_portal
    presented = Presented()
    exchange = exchange_with(oauth, presented)
    results = await asyncio.gather(exchange(portal), exchange(portal), return_exceptions=True)
    assert presented.tokens == [portal.refresh_token] * 2
    assert presented.refused == ["invalid_grant"]
    assert sum(isinstance(r, TokenError) for r in results) == 1


async def test_a_failed_exchange_changes_nothing(
    oauth_portal: tuple[OAuthClient, Portal], state: PgState
) -> None:
    oauth, portal = oauth_portal
    await state.save_portal(portal.with_tokens("expired-access", "not-a-live-token", 0))
    presented = Presented()
    with pytest.raises(TokenError):
        await state.refresh_portal(
            portal.member_id, "expired-access", exchange_with(oauth, presented)
        )
    stored = await state.portal(portal.member_id)
    assert stored is not None
    assert (stored.access_token, stored.refresh_token) == ("expired-access", "not-a-live-token")
    await state.uninstall(portal.member_id)
    with pytest.raises(TokenError, match="no stored refresh token"):
        await state.refresh_portal(portal.member_id, "", exchange_with(oauth, presented))
    assert presented.tokens == ["not-a-live-token"]
