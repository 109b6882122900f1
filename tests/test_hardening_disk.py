"""Disk: a state write that fails stops the drain before any publish that depends on it.

The state file lives on a tiny tmpfs that the test fills once the bridge runs (``chmod`` does not
stop root; a full filesystem stops everyone). SQLite then fails the journal write of the next
reservation: that page must not be published, ``/readyz`` must say why, and once space is back
the reservation (found as an orphan) is delivered and everything ends cleared.

Checked by breaking the code on purpose (then restored): with ``State._write`` swallowing
``sqlite3.Error`` (the journal write "succeeds" without being on disk), messages arrive while
the disk is full and the test fails on ``collector.messages == []``; with
``Service.readiness`` ignoring ``write_failure``, the readiness wait times out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace

EVENT = "ONCRMLEADADD"


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(volume)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield volume
    finally:
        subprocess.run(["umount", "-l", str(volume)], capture_output=True, timeout=30)


def _fill(volume: Path) -> Path:
    """Write until the filesystem is full; answers the filler file."""
    filler = volume / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


async def test_full_disk_stops_the_drain_before_publishing_and_recovers(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, small_volume: Path
) -> None:
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange(EVENT.lower()))
    env = await bridge_env(
        portal,
        amqp_ns,
        small_volume / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_POLL_INTERVAL="0",
    )
    total = 150
    async with bridge_in_process(env) as bridge, httpx.AsyncClient(base_url=bridge.url) as http:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        assert (await http.get("/readyz")).status_code == 200
        filler = _fill(small_volume)
        try:
            await portal.generate(EVENT, total)  # notifies the bridge: a drain starts

            async def not_ready() -> bool:
                return (await http.get("/readyz")).status_code == 503

            await until(not_ready, "/readyz to report the failed state write")
            reason = (await http.get("/readyz")).json()["reason"]
            assert "state file write failed" in reason, reason
            assert "full" in reason, reason
            queue = await portal.queue()
            reserved: dict[str, int] = queue["reserved"]
            # The page was reserved but its process_id could not be journaled: not published.
            assert sum(reserved.values()) > 0, queue
            assert queue["free"] + sum(reserved.values()) == total
            assert collector.messages == [], "published a page whose journal write failed"
            assert session.drainer.stopped is None
        finally:
            with contextlib.suppress(OSError):
                filler.unlink()
        # Space is back: the next pass finds the orphaned reservation and delivers it.
        await portal.wait_empty(timeout=60)
        await collector.wait_for(total, timeout=30)

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await until(ready, "/readyz to recover")
        assert bridge.service.state is not None
        journal = await bridge.service.state.journal_all()
    assert journal == []
    assert len(set(collector.message_ids)) == total
