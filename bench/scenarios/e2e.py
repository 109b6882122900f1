"""End-to-end latency: an event created in the portal until a consumer holds its message.

The emulator is unthrottled with ``minTimeout=0``, so every added event sends ``ONOFFLINEEVENT``
at once. Events are created one per request at a steady 50/s, each with a unique entity id;
latency = the consumer's arrival time minus the time the creating request was sent (one clock: both
happen in this process), matched by ``EVENT_DATA.FIELDS.ID``. Target: p99 ≤ 250 ms.
"""

from __future__ import annotations

import asyncio
import json
import time

from bench.context import Context
from bench.drainrun import EVENT, UNTHROTTLED
from bench.procs import Emulator, bridge_env, bridge_process, free_port, wait_first_pass
from bench.report import Result, percentile

TITLE = "end-to-end latency (50 events/s, minTimeout=0)"
RATE = 50.0
DRAIN_GRACE = 15.0


async def run(ctx: Context, result: Result) -> None:
    seconds = ctx.seconds(20.0, 5.0)
    total = max(1, int(RATE * seconds))
    port = free_port()
    emulator = Emulator(
        ctx.path("e2e-emulator.log"),
        rate_limit=None,
        min_timeout=0,
        auto_bind=True,
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
    )
    await emulator.start()
    ns = ctx.broker.namespace("e2e")
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    failures = 0

    def on_body(body: bytes) -> None:
        entity = str(json.loads(body)["EVENT_DATA"]["FIELDS"]["ID"])
        arrived.setdefault(entity, time.monotonic())

    bridge = None
    try:
        consumer = await ns.consume(ns.exchange(EVENT), on_body=on_body)
        env = await bridge_env(emulator, ns, ctx.path("e2e-state.sqlite3"), **UNTHROTTLED)
        bridge = bridge_process(env, ctx.path("e2e-bridge.log"), port=port)
        bridge.start()
        await bridge.wait_live("/livez")
        await wait_first_pass(bridge)

        async def create(entity: str) -> None:
            nonlocal failures
            sent[entity] = time.monotonic()
            try:
                await emulator.add([{"event": EVENT, "data": {"FIELDS": {"ID": entity}}}])
            except Exception:
                failures += 1

        tasks = []
        started = time.monotonic()
        for index in range(total):
            delay = started + index / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(create(f"e2e-{index}")))
        await asyncio.gather(*tasks)
        created_in = time.monotonic() - started
        await consumer.wait_for(total, DRAIN_GRACE)
    finally:
        if bridge is not None:
            await bridge.stop()
        await emulator.stop()
        await ns.delete()

    latencies = [arrived[e] - sent[e] for e in sent if e in arrived]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    result.metrics.update(
        {
            "events": total,
            "creation_rate_per_s": round(total / created_in, 1) if created_in > 0 else None,
            "arrived": len(latencies),
            "missing": total - len(latencies),
            "create_failures": failures,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        }
    )
    result.check("p99 latency", None if p99 is None else p99 * 1000, "<=", 250, "ms")
