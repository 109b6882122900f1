"""Drain throughput: a backlog in an unthrottled portal, the bridge against raw aio-pika.

The bridge (a subprocess, client-side rate limit out of the way) drains the backlog; then, to
the same broker, a subprocess publishes the same number of messages with plain aio-pika, once
through its public API and once through the aiormq channel under it (``bench.rawpublish``: same
bodies, properties and headers, persistent, ``mandatory``, confirms, gathered in windows of
1,000). All are timed until a consumer in this process holds every message; the bridge also
until the portal queue is empty. Target: bridge ≥ 0.85 x the faster raw run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys

from bench.context import Context
from bench.drainrun import EVENT, drain_backlog
from bench.rawpublish import STRATEGIES
from bench.report import Result

TITLE = "drain throughput (unthrottled)"
TARGET_RATIO = 0.85


async def raw_baseline(
    ctx: Context, strategy: str, count: int, *, member_id: str, domain: str, within: float
) -> tuple[float, bool]:
    """Seconds for raw aio-pika to get ``count`` messages to a consumer; and whether all came."""
    ns = ctx.broker.namespace("raw")
    try:
        exchange = ns.exchange(EVENT)
        consumer = await ns.consume(exchange)
        argv = [sys.executable, "-m", "bench.rawpublish", strategy, ns.url, exchange, str(count)]
        argv += [member_id, domain]
        proc = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, timeout=within, check=True
        )
        times = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        complete = await consumer.wait_for(count, max(1.0, within / 4))
        finished = max(float(times["confirmed"]), consumer.last_at)
        return finished - float(times["started"]), complete
    finally:
        await ns.delete()


async def run(ctx: Context, result: Result) -> None:
    count = ctx.size(50_000, 5_000)
    within = 60 + count / 400
    # The machine is shared by the broker, the emulator, the bridge and the consumer: single
    # runs vary by ±10 %. Bridge and baselines are interleaved over several rounds, and the
    # medians are compared.
    rounds = ctx.size(3, 1)
    bridge_rates: list[float] = []
    rates: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
    bridge = None
    for round_ in range(rounds):
        bridge = await drain_backlog(ctx, count, label=f"drain{round_}", within=within)
        bridge_rates.append(bridge.events_per_s)
        result.notes.extend(bridge.notes)
        for strategy in STRATEGIES:
            seconds, complete = await raw_baseline(
                ctx,
                strategy,
                count,
                member_id=bridge.member_id,
                domain=bridge.domain,
                within=within,
            )
            rates[strategy].append(count / seconds if seconds > 0 else 0.0)
            if not complete:
                result.notes.append(f"raw {strategy}: not every message reached the consumer")
    assert bridge is not None
    ctx.shared["drain"] = bridge
    bridge_rate = statistics.median(bridge_rates)
    result.metrics.update(
        {
            "events": count,
            "rounds": rounds,
            "bridge_events_per_s": round(bridge_rate, 1),
            "bridge_events_per_s_runs": [round(r) for r in bridge_rates],
            "bridge_complete": bridge.complete,
            "rest_requests": bridge.rest_requests,
            "events_per_rest_request": round(count / max(1, bridge.rest_requests), 1),
            "bridge_peak_rss_mb": round(bridge.peak_rss_mb, 1),
        }
    )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        result.metrics[f"raw_{name}_events_per_s"] = round(value, 1)
    best = max(medians, key=lambda name: medians[name])
    ratio = bridge_rate / medians[best] if medians[best] else None
    result.metrics["raw_reference"] = best
    result.metrics["ratio_bridge_to_raw"] = None if ratio is None else round(ratio, 3)
    result.check(f"bridge / raw ({best})", ratio, ">=", TARGET_RATIO)
