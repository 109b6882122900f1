"""One timed drain: a backlog in an unthrottled emulator, the bridge as a subprocess, a consumer.

The bridge starts against an empty portal and finishes its startup pass; then the backlog is
added in one request (which sends ``ONOFFLINEEVENT``, ``minTimeout=0``). The clock starts when
that request returns and stops when the consumer holds every message *and* the portal queue is
empty (cleared after confirmation). Process start-up is not part of the measurement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.context import Context
from bench.procs import (
    Emulator,
    bridge_env,
    bridge_process,
    free_port,
    sampling,
    wait_first_pass,
)

EVENT = "ONCRMLEADADD"
NUDGE_AFTER = 5.0  # no message this long after the backlog: send the notification again
# Unthrottled: no request rate and no operating-time limit, on either side. The emulator charges
# each call its own processing time, which on a 50,000-row queue would pace the drain to the
# emulator's speed, not the bridge's (the throttled scenario measures pacing).
UNLIMITED_OPERATING = 1e9
UNTHROTTLED = {
    "BRIDGE_RATE_LIMIT": "100000",
    "BRIDGE_RATE_BURST": "100000",
    "BRIDGE_OPERATING_LIMIT": str(UNLIMITED_OPERATING),
}


@dataclass
class DrainRun:
    count: int
    consumed: int = 0
    seconds: float = 0.0
    complete: bool = False
    peak_rss_mb: float = 0.0
    rest_requests: int = 0
    member_id: str = ""
    domain: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.consumed / self.seconds if self.seconds > 0 else 0.0


async def drain_backlog(
    ctx: Context, count: int, *, label: str, within: float, wrap: Sequence[str] = ()
) -> DrainRun:
    run = DrainRun(count)
    port = free_port()
    emulator = Emulator(
        ctx.path(f"{label}-emulator.log"),
        rate_limit=None,
        operating_limit=UNLIMITED_OPERATING,
        min_timeout=0,
        auto_bind=True,
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
    )
    await emulator.start()
    ns = ctx.broker.namespace(label)
    bridge = None
    try:
        app = await emulator.app()
        run.member_id, run.domain = app["member_id"], app["domain"]
        consumer = await ns.consume(ns.exchange(EVENT))
        env = await bridge_env(emulator, ns, ctx.path(f"{label}-state.sqlite3"), **UNTHROTTLED)
        bridge = bridge_process(env, ctx.path(f"{label}-bridge.log"), port=port, wrap=wrap)
        bridge.start()
        await bridge.wait_live("/livez")
        await wait_first_pass(bridge)
        requests_before = await emulator.requests()
        async with sampling(bridge.pid) as rss:
            await emulator.generate(EVENT, count)
            started = time.monotonic()
            deadline = started + within
            if not await consumer.wait_for(1, NUDGE_AFTER):
                run.notes.append("no message after the notification; sent another")
                await emulator.http.post("/_emulator/notify", json={})
            while consumer.count < count and time.monotonic() < deadline:
                bridge.check()
                await consumer.wait_for(count, min(1.0, max(0.0, deadline - time.monotonic())))
            finished = time.monotonic()
            while time.monotonic() < deadline and not await emulator.is_empty():
                await asyncio.sleep(0.02)
                finished = time.monotonic()
            run.consumed = consumer.count
            run.complete = consumer.count >= count and await emulator.is_empty()
            run.seconds = max(finished, consumer.last_at) - started
        run.peak_rss_mb = rss.peak_mb
        run.rest_requests = await emulator.requests() - requests_before
        if not run.complete:
            run.notes.append(f"timed out after {within:.0f}s: {consumer.count} of {count}")
        return run
    finally:
        if bridge is not None:
            await bridge.stop()
        await emulator.stop()
        await ns.delete()
