"""The state interface, on both backends (``state_backend``: the SQLite file and PostgreSQL)."""

import inspect
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bridge.amqp.fake import MemoryPublisher
from bridge.amqp.protocol import Confirmed, OutgoingMessage
from bridge.core.errors import StateError
from bridge.state import JournalEntry, Portal, State
from bridge.state.pg import PgState
from tests.state_backends import Backend


async def proof(*keys: str) -> Confirmed:
    """A publisher's proof that messages with these keys were confirmed (only a publisher
    makes one): the in-memory publisher's."""
    messages = [OutgoingMessage("x", "k", b"{}", f"m:{key}", "EV", None, {}, key) for key in keys]
    (result,) = await MemoryPublisher().publish_pages([messages])
    assert result.proof is not None
    return result.proof


PORTAL = Portal(
    member_id="m1",
    domain="acme.bitrix24.ru",
    client_endpoint="https://acme.bitrix24.ru/rest/",
    access_token="access-AAAA",
    refresh_token="refresh-BBBB",
    application_token="apptoken-CCCC",
    expires_at=123.0,
)


async def test_portal_round_trip_and_upsert(state_backend: Backend) -> None:
    state = await state_backend.open()
    await state.save_portal(PORTAL)
    assert await state.portal("m1") == PORTAL
    assert await state.portal("nobody") is None
    newer = PORTAL.with_tokens("a2", "r2", 456.0)
    await state.save_portal(newer)
    assert await state.portals() == [newer]
    await state.close()


async def test_portals_are_listed_by_domain_in_byte_order(state_backend: Backend) -> None:
    state = await state_backend.open()
    for member_id, domain in (("m1", "b.example"), ("m2", "B.example"), ("m3", "a.example")):
        await state.save_portal(Portal(member_id, domain, f"https://{domain}/rest/"))
    assert [p.domain for p in await state.portals()] == ["B.example", "a.example", "b.example"]
    await state.close()


async def test_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.sqlite3"
    state = await State.open(str(path))
    await state.save_portal(PORTAL)
    await state.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_journal_survives_reopen(state_backend: Backend) -> None:
    state = await state_backend.open()
    await state.journal_add("m1", "", ["p1", "p2"])
    await state.journal_add("m1", "conn", ["p3"])
    await state.journal_remove("m1", "", ["p1"])
    await state.close()
    state = await state_backend.open()
    assert await state.journal("m1", "") == ["p2"]
    assert await state.journal("m1", "conn") == ["p3"]
    await state.close()


async def test_journal_keeps_order_replay_flags_and_confirmed_marks(
    state_backend: Backend,
) -> None:
    state = await state_backend.open()
    await state.journal_add("m1", "", ["p2", "p1"])
    await state.journal_add("m1", "", ["p3"], replay=True)
    await state.journal_add("m1", "", ["p1"], replay=True)  # already there: unchanged
    await state.journal_add("m2", "", ["q1"])
    await state.journal_confirm("m1", "", {"p1": await proof("e1", "e2")})
    await state.journal_confirm("m1", "", {"p1": await proof("e2", "e3")})
    await state.journal_confirm("m1", "", {})
    assert await state.journal_entries("m1", "") == [
        JournalEntry("p2", False, frozenset()),
        JournalEntry("p1", False, frozenset({"e1", "e2", "e3"})),
        JournalEntry("p3", True, frozenset()),
    ]
    assert await state.journal_all() == [
        ("m1", "", "p2"),
        ("m1", "", "p1"),
        ("m1", "", "p3"),
        ("m2", "", "q1"),
    ]
    await state.journal_remove("m1", "", ["p1", "p3"])
    await state.journal_add("m1", "", ["p1"])  # a reservation id seen again starts unconfirmed
    assert await state.journal_entries("m1", "") == [
        JournalEntry("p2", False, frozenset()),
        JournalEntry("p1", False, frozenset()),
    ]
    await state.close()


async def test_uninstall_forgets_tokens(state_backend: Backend) -> None:
    state = await state_backend.open()
    await state.save_portal(PORTAL)
    await state.uninstall("m1")
    assert await state.portals() == []
    (gone,) = await state.portals(include_inactive=True)
    assert gone.status == "uninstalled"
    assert gone.access_token == ""
    assert gone.refresh_token == ""
    await state.close()


async def test_tokens_encrypted_at_rest(state_backend: Backend) -> None:
    key = Fernet.generate_key()
    state = await state_backend.open([key])
    await state.save_portal(PORTAL)
    await state.set_source_secret("src", "token", "source-secret-DDDD")
    await state.close()
    raw = await state_backend.raw()
    for secret in (b"access-AAAA", b"refresh-BBBB", b"apptoken-CCCC", b"source-secret-DDDD"):
        assert secret not in raw
    state = await state_backend.open([key])
    assert await state.portal("m1") == PORTAL
    assert await state.source_secret("src", "token") == "source-secret-DDDD"
    await state.close()


async def test_without_a_key_tokens_are_plain(state_backend: Backend) -> None:
    # The contrast to the test above: it proves the check there can fail.
    state = await state_backend.open()
    await state.save_portal(PORTAL)
    await state.close()
    assert b"refresh-BBBB" in await state_backend.raw()


async def test_wrong_key_is_a_clear_error_and_loses_nothing(state_backend: Backend) -> None:
    right = Fernet.generate_key()
    state = await state_backend.open([right])
    await state.save_portal(PORTAL)
    await state.close()
    with pytest.raises(StateError, match="cannot decrypt"):
        await state_backend.open([Fernet.generate_key()])
    with pytest.raises(StateError, match="BRIDGE_STATE_KEY is not set"):
        await state_backend.open([])
    state = await state_backend.open([right])
    assert await state.portal("m1") == PORTAL
    await state.close()


async def test_key_rotation(state_backend: Backend) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    state = await state_backend.open([old])
    await state.save_portal(PORTAL)
    await state.close()
    # Step 1: new key first, old key still listed: opening re-encrypts with the new key.
    state = await state_backend.open([new, old])
    assert await state.portal("m1") == PORTAL
    await state.close()
    # Step 2: the old key can go.
    state = await state_backend.open([new])
    assert await state.portal("m1") == PORTAL
    assert await state.rotate_keys() == 1
    await state.close()


async def test_failed_write_raises_changes_nothing_and_is_reported(
    state_backend: Backend,
) -> None:
    state = await state_backend.open()
    await state_backend.refuse("journal")
    with pytest.raises(StateError, match="write failed"):
        await state.journal_add("m1", "", ["p1"])
    assert state.write_failure is not None
    assert await state.journal("m1", "") == []
    await state_backend.allow()
    await state.journal_add("m1", "", ["p1"])
    assert state.write_failure is None
    assert await state.journal("m1", "") == ["p1"]
    await state.close()


async def test_sqlite_write_blocked_by_another_process_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    state = await State.open(str(path))
    # Another connection holds the write lock: our write cannot complete.
    other = sqlite3.connect(path, timeout=0)
    other.execute("BEGIN EXCLUSIVE")
    state._conn.execute("PRAGMA busy_timeout=50")
    with pytest.raises(StateError, match="write failed"):
        await state.journal_add("m1", "", ["p1"])
    assert state.write_failure is not None
    other.rollback()
    other.close()
    await state.journal_add("m1", "", ["p1"])
    assert state.write_failure is None
    await state.close()


async def test_portal_repr_hides_tokens() -> None:
    assert "refresh-BBBB" not in repr(PORTAL)
    assert "access-AAAA" not in repr(PORTAL)


async def test_several_source_values_are_written_together_or_not_at_all(
    state_backend: Backend,
) -> None:
    state = await state_backend.open([Fernet.generate_key()])
    try:
        await state.set_source_values("src", {"token": "t-1", "mark": "m-1"}, secret={"token"})
        assert await state.source_secret("src", "token") == "t-1"
        assert (await state.cursor("src", "token") or "").startswith("fernet:")
        assert await state.cursor("src", "mark") == "m-1"
        await state_backend.refuse("cursors", key="mark")  # the second row cannot be written
        with pytest.raises(StateError):
            await state.set_source_values("src", {"token": "t-2", "mark": "m-2"}, secret={"token"})
        assert await state.source_secret("src", "token") == "t-1"
        assert await state.cursor("src", "mark") == "m-1"
    finally:
        await state.close()


async def test_cursors(state_backend: Backend) -> None:
    state = await state_backend.open()
    assert await state.cursor("diadoc", "box") is None
    await state.set_cursor("diadoc", "box", "k1")
    await state.set_cursor("diadoc", "box", "k2")
    await state.set_cursor("diadoc", "other", "x")
    assert await state.cursor("diadoc", "box") == "k2"
    assert await state.source_secret("diadoc", "nothing") is None
    await state.close()


async def test_seen_sets_filter_and_keep_only_the_newest(state_backend: Backend) -> None:
    state = await state_backend.open()
    await state.seen_add("src", "box", ["a", "b", "c"], keep=10)
    await state.seen_add("src", "other", ["z"], keep=10)
    assert await state.seen_filter("src", "box", ["a", "c", "x", "a", "z"]) == {"a", "c"}
    await state.seen_add("src", "box", ["a", "d", "e"], keep=3)  # "a" is not refreshed
    assert await state.seen_filter("src", "box", ["a", "b", "c", "d", "e"]) == {"c", "d", "e"}
    assert await state.seen_filter("src", "other", ["z"]) == {"z"}
    assert await state.seen_filter("src", "box", []) == set()
    await state.close()


async def test_health_parked_rows_and_requests(state_backend: Backend) -> None:
    state = await state_backend.open()
    await state.set_health("m1", stop_reason="no scope")
    await state.set_health("m1", binding_error="handler refused")
    await state.set_health("m2", binding_error="x")
    await state.set_health("m2", binding_error="")
    assert await state.health() == {"m1": ("no scope", "handler refused"), "m2": ("", "")}

    await state.park("diadoc", "box", "r1", "malformed", '{"a": 1}')
    await state.park("bitrix24", "m1", "r2", "poison", "{}")
    await state.park("diadoc", "box", "r1", "still malformed", '{"a": 2}')  # replaced, last
    assert [(p.source, p.ref, p.reason, p.payload) for p in await state.parked()] == [
        ("bitrix24", "r2", "poison", "{}"),
        ("diadoc", "r1", "still malformed", '{"a": 2}'),
    ]
    assert [p.ref for p in await state.parked("diadoc")] == ["r1"]

    await state.request("m2", "replay")
    await state.request("m1", "replay")
    await state.request("m2", "replay")  # asked again: once, now the newest
    await state.request("m3", "other")
    assert await state.take_requests("replay") == ["m1", "m2"]
    assert await state.take_requests("replay") == []
    assert await state.take_requests("other") == ["m3"]
    await state.close()


def _public(cls: type) -> dict[str, inspect.Signature]:
    names = [n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))]
    return {n: inspect.signature(getattr(cls, n)) for n in names}


def test_postgres_state_has_every_method_of_the_state_file_with_its_signature() -> None:
    sqlite, postgres = _public(State), _public(PgState)
    assert set(sqlite) - {"open"} <= set(postgres)
    for name, signature in sqlite.items():
        if name != "open":
            assert postgres[name] == signature, name
