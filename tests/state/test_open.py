"""Choosing the state backend from the settings, and opening one that cannot be reached."""

from pathlib import Path

import pytest
from yarl import URL

from bridge.core.errors import StateError
from bridge.settings import load_settings
from bridge.state import Portal, State
from bridge.state.open import open_state
from bridge.state.pg import PgState
from tests.harness import free_port


async def test_sqlite_by_default(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    state = await open_state(load_settings({"BRIDGE_STATE_PATH": str(path)}))
    try:
        assert isinstance(state, State)
        await state.save_portal(Portal("m1", "a.example", "https://a.example/rest/"))
    finally:
        await state.close()
    assert path.exists()


async def test_postgres_when_a_state_url_is_set(pg_url: str, tmp_path: Path) -> None:
    path = tmp_path / "unused.sqlite3"
    env = {"BRIDGE_STATE_URL": pg_url, "BRIDGE_STATE_PATH": str(path)}
    state = await open_state(load_settings(env))
    try:
        assert isinstance(state, PgState)
        await state.save_portal(Portal("m1", "a.example", "https://a.example/rest/"))
    finally:
        await state.close()
    assert not path.exists()
    again = await PgState.open(pg_url)
    try:
        assert [p.member_id for p in await again.portals()] == ["m1"]
    finally:
        await again.close()


async def test_an_unreachable_database_is_one_line_without_the_password(pg_url: str) -> None:
    dead = str(URL(pg_url).with_port(free_port()).with_user("bridge").with_password("hunter2"))
    with pytest.raises(StateError) as caught:
        await PgState.open(dead)
    message = str(caught.value)
    assert "cannot open the state database" in message
    assert "hunter2" not in message
    assert "bridge:***@" in message
    assert "\n" not in message


async def test_a_schema_newer_than_this_release_is_refused(pg_url: str) -> None:
    state = await PgState.open(pg_url)
    async with state.pool.connection() as conn:
        await conn.execute("INSERT INTO bridge_schema VALUES (99)")
    await state.close()
    with pytest.raises(StateError, match="newer than this bridge"):
        await PgState.open(pg_url)
