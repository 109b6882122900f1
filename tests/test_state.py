import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bridge.core.errors import StateError
from bridge.state import Portal, State

PORTAL = Portal(
    member_id="m1",
    domain="acme.bitrix24.ru",
    client_endpoint="https://acme.bitrix24.ru/rest/",
    access_token="access-AAAA",
    refresh_token="refresh-BBBB",
    application_token="apptoken-CCCC",
    expires_at=123.0,
)


async def test_portal_round_trip_and_upsert(tmp_path: Path) -> None:
    state = await State.open(str(tmp_path / "s.sqlite3"))
    await state.save_portal(PORTAL)
    assert await state.portal("m1") == PORTAL
    newer = PORTAL.with_tokens("a2", "r2", 456.0)
    await state.save_portal(newer)
    assert await state.portals() == [newer]
    await state.close()


async def test_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.sqlite3"
    state = await State.open(str(path))
    await state.save_portal(PORTAL)
    await state.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_journal_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    state = await State.open(path)
    await state.journal_add("m1", "", ["p1", "p2"])
    await state.journal_add("m1", "conn", ["p3"])
    await state.journal_remove("m1", "", ["p1"])
    await state.close()
    state = await State.open(path)
    assert await state.journal("m1", "") == ["p2"]
    assert await state.journal("m1", "conn") == ["p3"]
    await state.close()


async def test_uninstall_forgets_tokens(tmp_path: Path) -> None:
    state = await State.open(str(tmp_path / "s.sqlite3"))
    await state.save_portal(PORTAL)
    await state.uninstall("m1")
    assert await state.portals() == []
    (gone,) = await state.portals(include_inactive=True)
    assert gone.status == "uninstalled"
    assert gone.access_token == ""
    assert gone.refresh_token == ""
    await state.close()


def _raw_text(path: Path) -> bytes:
    data = path.read_bytes()
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            data += side.read_bytes()
    return data


async def test_tokens_encrypted_at_rest(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    key = Fernet.generate_key()
    state = await State.open(str(path), [key])
    await state.save_portal(PORTAL)
    await state.close()
    raw = _raw_text(path)
    for secret in (b"access-AAAA", b"refresh-BBBB", b"apptoken-CCCC"):
        assert secret not in raw
    state = await State.open(str(path), [key])
    assert await state.portal("m1") == PORTAL
    await state.close()


async def test_without_a_key_tokens_are_plain(tmp_path: Path) -> None:
    # The contrast to the test above: it proves the check there can fail.
    path = tmp_path / "s.sqlite3"
    state = await State.open(str(path))
    await state.save_portal(PORTAL)
    await state.close()
    assert b"refresh-BBBB" in _raw_text(path)


async def test_wrong_key_is_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    right = Fernet.generate_key()
    state = await State.open(str(path), [right])
    await state.save_portal(PORTAL)
    await state.close()
    with pytest.raises(StateError, match="cannot decrypt"):
        await State.open(str(path), [Fernet.generate_key()])
    with pytest.raises(StateError, match="BRIDGE_STATE_KEY is not set"):
        await State.open(str(path), [])
    state = await State.open(str(path), [right])
    assert await state.portal("m1") == PORTAL
    await state.close()


async def test_key_rotation(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    old, new = Fernet.generate_key(), Fernet.generate_key()
    state = await State.open(str(path), [old])
    await state.save_portal(PORTAL)
    await state.close()
    # Step 1: new key first, old key still listed: opening re-encrypts with the new key.
    state = await State.open(str(path), [new, old])
    assert await state.portal("m1") == PORTAL
    await state.close()
    # Step 2: the old key can go.
    state = await State.open(str(path), [new])
    assert await state.portal("m1") == PORTAL
    await state.close()


async def test_failed_write_raises_and_is_reported(tmp_path: Path) -> None:
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


async def test_several_source_values_are_written_together_or_not_at_all(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    state = await State.open(path, [Fernet.generate_key()])
    try:
        await state.set_source_values("src", {"token": "t-1", "mark": "m-1"}, secret={"token"})
        assert await state.source_secret("src", "token") == "t-1"
        assert (await state.cursor("src", "token") or "").startswith("fernet:")
        assert await state.cursor("src", "mark") == "m-1"
        with sqlite3.connect(path) as conn:  # the second row cannot be written
            conn.execute(
                "CREATE TRIGGER no_mark BEFORE UPDATE ON cursors WHEN NEW.key = 'mark' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        with pytest.raises(StateError):
            await state.set_source_values("src", {"token": "t-2", "mark": "m-2"}, secret={"token"})
        assert await state.source_secret("src", "token") == "t-1"
        assert await state.cursor("src", "mark") == "m-1"
    finally:
        await state.close()
