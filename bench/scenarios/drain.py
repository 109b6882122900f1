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
    bridge = await drain_backlog(ctx, count, label="drain", within=within)
    ctx.shared["drain"] = bridge
    result.metrics.update(
        {
            "events": count,
            "bridge_seconds": round(bridge.seconds, 2),
            "bridge_events_per_s": round(bridge.events_per_s, 1),
            "bridge_complete": bridge.complete,
            "rest_requests": bridge.rest_requests,
            "events_per_rest_request": round(count / max(1, bridge.rest_requests), 1),
            "bridge_peak_rss_mb": round(bridge.peak_rss_mb, 1),
        }
    )
    result.notes.extend(bridge.notes)
    rates = {}
    for strategy in STRATEGIES:
        seconds, complete = await raw_baseline(
            ctx, strategy, count, member_id=bridge.member_id, domain=bridge.domain, within=within
        )
        rates[strategy] = count / seconds if seconds > 0 else 0.0
        result.metrics[f"raw_{strategy}_events_per_s"] = round(rates[strategy], 1)
        if not complete:
            result.notes.append(f"raw {strategy}: not every message reached the consumer")
    best = max(rates, key=lambda name: rates[name])
    ratio = bridge.events_per_s / rates[best] if rates[best] else None
    result.metrics["raw_reference"] = best
    result.metrics["ratio_bridge_to_raw"] = None if ratio is None else round(ratio, 3)
    result.check(f"bridge / raw ({best})", ratio, ">=", TARGET_RATIO)
