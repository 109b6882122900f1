"""``bitrix24-bridge backup PATH``: SQLite's online backup API, usable while ``serve`` runs."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest

from bridge.core.errors import ConfigError, StateError
from bridge.state import Portal, State
from bridge.state.backup import backup
from tests.harness import BridgeProcess, bridge_env, emulated_portal
from tests.plugins.broker import AmqpNamespace
from tests.test_cli import run as run_cli

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtMzItYnl0ZXMhISE="


async def make_state(path: Path, keys: tuple[bytes, ...] = ()) -> Portal:
    state = await State.open(str(path), keys)
    portal = Portal(
        member_id="m" * 32,
        domain="acme.bitrix24.ru",
        client_endpoint="https://acme.bitrix24.ru/rest/",
        server_endpoint="https://oauth.bitrix.info/rest/",
        access_token="access-" + "1" * 20,
        refresh_token="refresh-" + "2" * 20,
        application_token="app-" + "3" * 20,
        expires_at=1.0,
    )
    await state.save_portal(portal)
    await state.journal_add(portal.member_id, "", ["p" * 32])
    await state.close()
    return portal


async def test_cli_backup_is_a_complete_owner_only_copy(tmp_path: Path) -> None:
    live = tmp_path / "state.sqlite3"
    portal = await make_state(live, (KEY.encode(),))
    out = tmp_path / "out" / "copy.sqlite3"
    out.parent.mkdir()
    env = {"BRIDGE_STATE_PATH": str(live)}
    proc = run_cli(env, "backup", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # One self-contained file: no -wal/-shm beside it, no partial left behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.sqlite3"]
    copy = await State.open(str(out), (KEY.encode(),))
    try:
        (restored,) = await copy.portals()
        assert restored.refresh_token == portal.refresh_token
        assert await copy.journal(portal.member_id, "") == ["p" * 32]
    finally:
        await copy.close()


async def test_bad_targets_are_refused_and_change_nothing(tmp_path: Path) -> None:
    live = tmp_path / "state.sqlite3"
    await make_state(live)
    before = live.read_bytes()
    existing = tmp_path / "existing.sqlite3"
    existing.write_bytes(b"keep me")
    env = {"BRIDGE_STATE_PATH": str(live)}
    for args, message in [
        ((str(existing),), "exists"),
        ((str(tmp_path),), "directory"),
        ((str(tmp_path / "missing" / "b.sqlite3"),), "does not exist"),
        ((str(live), "--force"), "state file itself"),
    ]:
        proc = run_cli(env, "backup", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
        assert proc.stderr.count("\n") == 1, "one line, no traceback"
    assert existing.read_bytes() == b"keep me"
    assert live.read_bytes() == before
    nothing = run_cli({"BRIDGE_STATE_PATH": str(tmp_path / "none.sqlite3")}, "backup", "x")
    assert nothing.returncode == 2
    assert "no state file" in nothing.stderr
    assert not (tmp_path / "none.sqlite3").exists()  # a backup never creates a state file

    assert run_cli(env, "backup", "--force", str(existing)).returncode == 0
    assert existing.read_bytes()[:16] == b"SQLite format 3\x00"


def test_a_corrupt_state_file_fails_without_a_copy(tmp_path: Path) -> None:
    live = tmp_path / "state.sqlite3"
    live.write_bytes(b"this is not a database" * 100)
    target = tmp_path / "b.sqlite3"
    with pytest.raises(StateError, match=r"backup of .* failed"):
        backup(str(live), str(target))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [live]
    with pytest.raises(ConfigError):
        backup(str(tmp_path / "absent"), str(target))


async def test_backup_while_serve_drains(amqp_ns: AmqpNamespace, tmp_path: Path) -> None:
    # serve writes the journal for every page while the backups run; each copy must be a
    # consistent database holding the portal's live tokens, and serve must not notice.
    async with emulated_portal() as (_server, portal, port):
        state = tmp_path / "state.sqlite3"
        env = await bridge_env(portal, amqp_ns, state, BRIDGE_HTTP_PORT=str(port))
        collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
        bridge = BridgeProcess(env, tmp_path / "serve.log")
        bridge.start()
        try:
            await bridge.wait_live()
            copies = []
            for i in range(5):
                # New events before every backup keep serve reserving and journalling meanwhile.
                await portal.generate("ONCRMLEADADD", 1000, start_id=1 + i * 1000)
                target = tmp_path / f"backup-{i}.sqlite3"
                proc = await asyncio.to_thread(run_cli, env, "backup", str(target))
                assert proc.returncode == 0, proc.stderr
                copies.append(target)
            await portal.wait_empty(timeout=120)
            await collector.wait_for(5000)
            assert bridge.proc is not None
            assert bridge.proc.poll() is None, bridge.tail()
        finally:
            bridge.stop()
    for target in copies:
        conn = sqlite3.connect(target)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            (count,) = conn.execute("SELECT count(*) FROM portals").fetchone()
            assert count == 1
        finally:
            conn.close()
