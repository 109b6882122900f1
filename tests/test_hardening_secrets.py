"""Secrets at rest, end to end: ``serve`` with a wrong key is one clear line, and loses nothing.

``tests/state/test_state.py`` proves encryption, rotation, the wrong-key error and 0600 on the State
class; this proves the operator's view: the real command, its exit code, its single line on
stderr (no traceback, no token), and the state file byte for byte as it was.

Checked by breaking the code on purpose (then restored): with ``cli.main`` not catching
``BridgeError`` the traceback fails the one-line check.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bridge.state import Portal, State
from tests.harness import free_port

SECRETS = ("access-Q9x7", "refresh-Z3k1", "apptoken-M5v2")
PORTAL = Portal(
    member_id="m" * 32,
    domain="acme.example",
    client_endpoint="http://127.0.0.1:9/rest/",
    access_token=SECRETS[0],
    refresh_token=SECRETS[1],
    application_token=SECRETS[2],
    expires_at=1.0,
)


def _digest(path: Path) -> dict[str, str]:
    """Hashes of the state file and any side file SQLite left next to it."""
    found = {}
    for side in (path, Path(f"{path}-wal"), Path(f"{path}-journal")):
        if side.exists() and side.stat().st_size:
            found[side.name] = hashlib.sha256(side.read_bytes()).hexdigest()
    return found


def _serve(state_path: Path, amqp_url: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_STATE_PATH=str(state_path),
        BRIDGE_CLIENT_ID="app.1",
        BRIDGE_CLIENT_SECRET="client-secret-X1",
        BRIDGE_AMQP_URL=amqp_url,
        BRIDGE_HTTP_HOST="127.0.0.1",
        BRIDGE_HTTP_PORT=str(free_port()),
        BRIDGE_LOG_FORMAT="text",
    )
    if key is not None:
        env["BRIDGE_STATE_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("wrong", "cannot decrypt"),
        ("rotated-without-old", "cannot decrypt"),
        ("none", "BRIDGE_STATE_KEY is not set"),
    ],
)
async def test_serve_with_a_wrong_key_exits_with_one_line_and_touches_nothing(
    tmp_path: Path, amqp_url: str, key: str, says: str
) -> None:
    path = tmp_path / "state.sqlite3"
    right = Fernet.generate_key().decode()
    state = await State.open(str(path), [right.encode()])
    await state.save_portal(PORTAL)
    await state.journal_add(PORTAL.member_id, "", ["p" * 32])
    await state.close()
    before = _digest(path)
    raw = path.read_bytes()
    assert all(secret.encode() not in raw for secret in SECRETS)

    given = {
        "wrong": Fernet.generate_key().decode(),
        # A rotation done wrong: a new key listed, the old one dropped too early.
        "rotated-without-old": f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}",
        "none": None,
    }[key]
    done = _serve(path, amqp_url, given)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bitrix24-bridge: error:")
    assert says in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    for secret in (*SECRETS, right, "client-secret-X1"):
        assert secret not in done.stdout + done.stderr
    # Nothing was written, nothing lost: the right key still opens everything.
    assert _digest(path) == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    state = await State.open(str(path), [right.encode()])
    try:
        assert await state.portal(PORTAL.member_id) == PORTAL
        assert await state.journal(PORTAL.member_id, "") == ["p" * 32]
    finally:
        await state.close()


async def test_serve_with_a_malformed_key_exits_with_one_line(
    tmp_path: Path, amqp_url: str
) -> None:
    done = _serve(tmp_path / "state.sqlite3", amqp_url, "not-a-fernet-key")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "BRIDGE_STATE_KEY" in lines[0]
    assert "not-a-fernet-key" not in done.stderr
    assert not (tmp_path / "state.sqlite3").exists(), "a bad key must not create a state file"
