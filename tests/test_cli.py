"""The one-shot commands, run as a user runs them: a subprocess with an environment."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge import cli
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env
from tests.plugins.broker import AmqpNamespace


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def arun(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, env, *args)


PortalFactory = Callable[..., tuple[EmulatorServer, Portal]]


@pytest.fixture
async def portal_factory() -> AsyncIterator[PortalFactory]:
    servers: list[EmulatorServer] = []
    portals: list[Portal] = []

    def make(**config: Any) -> tuple[EmulatorServer, Portal]:
        server = EmulatorServer(EmulatorConfig(rate_limit=None, **config)).start()
        servers.append(server)
        portals.append(Portal(server.base_url))
        return server, portals[-1]

    yield make
    for portal in portals:
        await portal.close()
    for server in servers:
        server.stop()


async def test_drain_empties_the_queue_and_exits_0(
    portal_factory: PortalFactory, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal = portal_factory(auto_bind=True)
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(portal, amqp_ns, tmp_path / "s.sqlite3")
    await portal.generate("ONCRMLEADADD", 300)
    proc = await arun(env, "drain")
    assert proc.returncode == 0, proc.stderr
    assert await portal.is_empty()
    await collector.wait_for(300)


async def test_drain_exits_1_when_a_portal_is_refused(
    portal_factory: PortalFactory, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    # A portal without rest_offline_extended refuses reservations with WRONG_LICENSE.
    _server, portal = portal_factory(auto_bind=True, offline_extended=False)
    env = await bridge_env(portal, amqp_ns, tmp_path / "s.sqlite3")
    await portal.generate("ONCRMLEADADD", 3)
    proc = await arun(env, "drain")
    assert proc.returncode == 1
    assert "WRONG_LICENSE" in proc.stderr
    assert "Traceback" not in proc.stderr
    queue = await portal.queue()
    assert queue["free"] == 3  # nothing was taken, nothing lost


async def test_status_reports_portals_tokens_journal_and_depth(
    portal_factory: PortalFactory, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _server, portal = portal_factory(auto_bind=True)
    state = tmp_path / "s.sqlite3"
    env = await bridge_env(portal, amqp_ns, state)
    await portal.generate("ONCRMLEADADD", 2)
    assert (await arun(env, "drain")).returncode == 0
    await portal.generate("ONCRMLEADADD", 7, start_id=100)
    from bridge.state import State

    store = await State.open(str(state))
    (stored,) = await store.portals()
    await store.journal_add(stored.member_id, "", ["p" * 32])
    await store.close()

    proc = await arun(env, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (entry,) = report["portals"]
    assert entry["member_id"] == stored.member_id
    assert entry["status"] == "active"
    assert entry["refresh_token"] is True
    assert entry["in_flight"] == ["p" * 32]
    assert entry["queue_depth"] == 7
    assert stored.refresh_token not in proc.stdout
    assert stored.access_token not in proc.stdout

    human = await arun(env, "status", "--offline")
    assert human.returncode == 0
    assert "in-flight process_ids: " + "p" * 32 in human.stdout


async def test_bind_creates_offline_bindings_and_the_handler(
    portal_factory: PortalFactory, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    server, portal = portal_factory()
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "s.sqlite3",
        BRIDGE_EVENTS="ONCRMLEADADD,ONCRMDEALADD",
        BRIDGE_PUBLIC_URL="https://bridge.example",
        BRIDGE_MIN_TIMEOUT="3",
    )
    first = await arun(env, "bind")
    assert first.returncode == 0, first.stderr
    assert "ONCRMLEADADD" in first.stdout
    again = await arun(env, "bind")
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout

    emulated = server.portal
    assert emulated is not None
    offline = server.run_in_loop(lambda: sorted(e for e, _c in emulated.offline))
    online = server.run_in_loop(lambda: [(b.handler, b.min_timeout) for b in emulated.online])
    assert offline == ["ONCRMDEALADD", "ONCRMLEADADD"]
    assert online == [("https://bridge.example/bitrix24/events", 3)]


def test_bind_without_anything_to_bind_is_one_line(tmp_path: Path) -> None:
    proc = run({"BRIDGE_STATE_PATH": str(tmp_path / "s.sqlite3")}, "bind")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "BRIDGE_EVENTS" in proc.stderr


def test_tune_gc_freezes_the_startup_heap_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        cli.tune_gc()
        assert gc.get_threshold() == cli.GC_THRESHOLDS
        assert cli.GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("command", ["serve", "drain", "bind"])
def test_a_handler_url_a_portal_would_refuse_is_one_line_and_exit_2(
    tmp_path: Path, command: str
) -> None:
    proc = run(
        {
            "BRIDGE_STATE_PATH": str(tmp_path / "s.sqlite3"),
            "BRIDGE_CLIENT_ID": "local.x",
            "BRIDGE_CLIENT_SECRET": "s",
            "BRIDGE_PUBLIC_URL": "http://bridge:8080",
        },
        command,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "BRIDGE_PUBLIC_URL" in proc.stderr
    assert "no dot" in proc.stderr


@pytest.mark.parametrize(("command", "hint"), [("drain", "serve"), ("backup", "pg_dump")])
def test_scaled_mode_refuses_the_commands_of_one_replica(
    command: str, hint: str, tmp_path: Path
) -> None:
    url = "postgresql://bridge:hunter2@127.0.0.1:5432/bridge"
    state = tmp_path / "s.sqlite3"
    args = [command, str(tmp_path / "copy")] if command == "backup" else [command]
    proc = run({"BRIDGE_STATE_URL": url, "BRIDGE_STATE_PATH": str(state)}, *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "BRIDGE_STATE_URL" in lines[0]
    assert hint in lines[0]
    assert "hunter2" not in proc.stderr + proc.stdout
    assert not state.exists()
