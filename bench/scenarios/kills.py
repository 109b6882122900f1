"""Duplicates per SIGKILL: the bridge killed at random moments inside a drain, and restarted.

A backlog in an unthrottled portal; the bridge (a subprocess) is SIGKILLed several times, each
time after a random share of the backlog has arrived since its last start, and started again.
Every event must arrive (checked by its ``ID``); what arrives more than once is the cost of the
kills. The drain records what the broker confirmed in the journal right after each pipelined
publish run, so a kill re-publishes at most the events of the run in flight: the bound is
``(LOOKAHEAD + 1) x MAX_RESERVATIONS x BRIDGE_PAGE_SIZE`` events per kill (3,750 with the
defaults), whatever the size of the backlog. The random moments are seeded (``--seed``): runs
compare.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter

from bench.context import Context
from bench.drainrun import EVENT, UNTHROTTLED
from bench.procs import Emulator, bridge_env, bridge_process, free_port, wait_first_pass
from bench.report import Result
from bridge.bitrix24.offline_queue import LOOKAHEAD, MAX_RESERVATIONS

TITLE = "duplicates per SIGKILL (unthrottled drain)"
PAGE = 50
BOUND = (LOOKAHEAD + 1) * MAX_RESERVATIONS * PAGE


async def run(ctx: Context, result: Result) -> None:
    count = ctx.size(50_000, 10_000)
    kills = ctx.size(5, 3)
    rng = ctx.random("kills")
    result.metrics["seed"] = ctx.seed
    port = free_port()
    emulator = Emulator(
        ctx.path("kills-emulator.log"),
        rate_limit=None,
        min_timeout=0,
        auto_bind=True,
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
    )
    await emulator.start()
    ns = ctx.broker.namespace("kills")
    seen: Counter[str] = Counter()
    bridge = None
    try:
        consumer = await ns.consume(ns.exchange(EVENT))
        consumer.on_body = lambda body: seen.update([str(json.loads(body)["ID"])])
        env = await bridge_env(emulator, ns, ctx.path("kills-state.sqlite3"), **UNTHROTTLED)
        bridge = bridge_process(env, ctx.path("kills-bridge.log"), port=port)
        bridge.start()
        await bridge.wait_live("/livez")
        await wait_first_pass(bridge)
        await emulator.generate(EVENT, count)
        done = 0
        for _ in range(kills):
            # Somewhere inside the drain: a random share of what is left, at least one page.
            target = consumer.count + rng.randint(PAGE, max(PAGE, (count - len(seen)) // 3))
            await consumer.wait_for(min(target, count - PAGE), 120)
            assert bridge.proc is not None
            os.kill(bridge.pid, signal.SIGKILL)
            await asyncio.to_thread(bridge.proc.wait, 10)
            done += 1
            bridge.start()
            await bridge.wait_live("/livez")
        for _ in range(600):
            if len(seen) >= count and await emulator.is_empty():
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # late duplicates, if any, arrive now
        final = await emulator.queue()
        if len(seen) < count:
            result.notes.append(
                f"portal queue at the end: free={final['free']} "
                f"reserved={sum(final['reserved'].values())} errors={final.get('errors')}"
            )
    finally:
        if bridge is not None:
            await bridge.stop()
        await emulator.stop()
        await ns.delete()
    duplicates = sum(seen.values()) - len(seen)
    per_kill = duplicates / done if done else None
    result.metrics.update(
        {
            "events": count,
            "kills": done,
            "delivered": sum(seen.values()),
            "unique": len(seen),
            "duplicates": duplicates,
            "duplicates_per_kill": None if per_kill is None else round(per_kill, 1),
            "most_copies": max(seen.values(), default=0),
            "bound_per_kill": BOUND,
        }
    )
    result.check("events lost", count - len(seen), "<=", 0)
    result.check("duplicates per kill", per_kill, "<=", BOUND)
    result.check("copies of one event", max(seen.values(), default=0), "<=", 1 + done)
