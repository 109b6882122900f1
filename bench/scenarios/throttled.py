"""Throttled throughput: a portal with a real portal's limits, the bridge with its defaults.

The emulator: leaky bucket 2 requests/s with a burst of 50, 20 ms latency per request, and the
``rest`` module's LoadLimiter v2: per method an operating-time limit of B = 420 s per ten
minutes, a fixed 300 s ban when it is exceeded, ``batch`` charged half its duration. Each call
is charged ``op_cost_per_call`` (c = 10 ms) plus ``op_cost_per_row`` (r = 0.3 ms) per row read,
plus its real processing time (p). The bridge runs with its default ``BRIDGE_RATE_LIMIT=2``,
``BRIDGE_RATE_BURST=50`` and ``BRIDGE_OPERATING_LIMIT=420``.

The ceiling these limits imply, for pages of L events (L = the larger of ``BRIDGE_PAGE_SIZE``'s
default 50 and the rows per reservation observed):

* operating time of ``event.offline.get``: a method may use B / 600 = 0.7 s per second, and
  reserving a page costs c + L·r + p_get, so at most ``0.7 / (c + L·r + p_get) · L`` events/s
  (L = 50, p ≈ 0: 0.7 / 0.025 · 50 = 1,400 events/s);
* operating time of ``event.offline.clear`` (no rows read): ``0.7 / (c + p_clear) · L``;
* operating time of ``batch`` itself: a batch carrying a reservation and a clear per page is
  charged half of their time and its own, ``0.7 / (0.5 · (2c + L·r + p_get + p_clear)) · L``
  (2,000 events/s);
* request rate: one ``batch`` of at most 50 commands holds 25 reservations and the 25 clears
  that go with them, so at most ``rate_limit · 25 · L`` = 2 · 25 · 50 = 2,500 events/s.

The ceiling is the smallest of these. p_get and p_clear are measured: the operating time the
emulator charged in the steady window minus the modelled part, per call.

Two runs. The first starts from a fresh budget; steady state excludes the first ten seconds
(five with ``--quick``) and the tail once 98% of the backlog has arrived. The second is a
restart mid-backlog: the portal has already charged 395 of the 420 s to
``event.offline.get`` (and to ``batch``) when the bridge starts. Neither may be banned; the
second must still move at least half of what the 25 s left allow (``25 / (c + L·r) · L``
events, or what the request rate allows in the run, whichever is smaller), instead of
stopping or being banned for 300 s.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from bench.context import Context
from bench.drainrun import EVENT
from bench.procs import Emulator, bridge_env, bridge_process, free_port
from bench.report import Result

TITLE = "throttled throughput (2 req/s, burst 50, op-time budget)"
GET, CLEAR, BATCH = "event.offline.get", "event.offline.clear", "batch"
LIMIT_ERRORS = ("QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT")
BATCH_COMMANDS = 50
DEFAULT_PAGE = 50
WINDOW_SECONDS = 600.0

PORTAL = {
    "rate_limit": 2.0,
    "rate_burst": 50,
    "latency_ms": 20.0,
    "op_cost_per_call": 0.010,
    "op_cost_per_row": 0.0003,
    "operating_limit": 420.0,
}
PRESPENT = 395.0  # operating seconds already charged when the restarted bridge starts


@dataclass(frozen=True)
class Ceiling:
    events_per_s: float
    bound_by: str
    terms: dict[str, float]


def ceiling(
    *,
    rate_limit: float,
    op_cost_per_call: float,
    op_cost_per_row: float,
    operating_limit: float,
    page: float = DEFAULT_PAGE,
    processing: dict[str, float] | None = None,
) -> Ceiling:
    """The events/s the portal's limits allow at ``page`` events per reservation (see above)."""
    p = processing or {}
    per_second = operating_limit / WINDOW_SECONDS
    pages_per_batch = BATCH_COMMANDS // 2
    get_cost = op_cost_per_call + page * op_cost_per_row + p.get(GET, 0.0)
    clear_cost = op_cost_per_call + p.get(CLEAR, 0.0)
    # A batch of n reservations and n clears: half of (n·(get + clear) + its own call).
    batch_per_page = 0.5 * (get_cost + clear_cost + op_cost_per_call / pages_per_batch)
    terms = {
        "get operating time": per_second / get_cost * page,
        "clear operating time": per_second / clear_cost * page,
        "batch operating time": per_second / batch_per_page * page,
        "request rate": rate_limit * pages_per_batch * page,
    }
    bound_by = min(terms, key=lambda name: terms[name])
    return Ceiling(terms[bound_by], bound_by, terms)


@dataclass
class Snapshot:
    at: float
    consumed: int
    requests: int
    calls: dict[str, int]
    errors: dict[str, int]
    operating: dict[str, float]
    bans: int


async def _snapshot(emulator: Emulator, consumed: int) -> Snapshot:
    stats: dict[str, Any] = await emulator.stats()
    return Snapshot(
        time.monotonic(),
        consumed,
        await emulator.requests(),
        dict(stats["calls"]),
        dict(stats["errors"]),
        {k: float(v) for k, v in stats["operating"].items()},
        sum(int(n) for n in stats.get("bans_imposed", {}).values()),
    )


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
    return float(after.get(key, 0)) - float(before.get(key, 0))


@dataclass
class Run:
    start: Snapshot
    steady: Snapshot
    end: Snapshot
    count: int


async def _drain(ctx: Context, label: str, count: int, duration: float, prespent: float) -> Run:
    warmup = min(10.0, duration / 4) if not prespent else 0.0
    port = free_port()
    emulator = Emulator(
        ctx.path(f"{label}-emulator.log"),
        **PORTAL,
        auto_bind=True,
        min_timeout=0,
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
    )
    await emulator.start()
    ns = ctx.broker.namespace(label)
    bridge = None
    try:
        consumer = await ns.consume(ns.exchange(EVENT))
        await emulator.generate(EVENT, count)
        for method in (GET, BATCH) if prespent else ():
            await emulator.http.post(
                "/_emulator/operating", json={"method": method, "seconds": prespent}
            )
        env = await bridge_env(emulator, ns, ctx.path(f"{label}-state.sqlite3"))
        bridge = bridge_process(env, ctx.path(f"{label}-bridge.log"), port=port)
        start = await _snapshot(emulator, 0)
        bridge.start()
        await bridge.wait_live("/livez")
        steady: Snapshot | None = None
        while time.monotonic() - start.at < duration:
            bridge.check()
            await asyncio.sleep(0.25)
            now = time.monotonic() - start.at
            if steady is None and now >= warmup:
                steady = await _snapshot(emulator, consumer.count)
            if consumer.count >= 0.98 * count:
                break
        end = await _snapshot(emulator, consumer.count)
    finally:
        if bridge is not None:
            await bridge.stop()
        await emulator.stop()
        await ns.delete()
    return Run(start, steady or start, end, count)


def _processing(run: Run, page: float) -> dict[str, float]:
    processing = {}
    for method, modelled_rows in ((GET, page), (CLEAR, 0.0)):
        calls = _delta(run.end.calls, run.steady.calls, method)
        if calls > 0:
            charged = _delta(run.end.operating, run.steady.operating, method) / calls
            modelled = PORTAL["op_cost_per_call"] + modelled_rows * PORTAL["op_cost_per_row"]
            processing[method] = max(0.0, charged - modelled)
    return processing


async def run(ctx: Context, result: Result) -> None:
    duration = ctx.seconds(60.0, 20.0)
    model = ceiling(
        rate_limit=PORTAL["rate_limit"],
        op_cost_per_call=PORTAL["op_cost_per_call"],
        op_cost_per_row=PORTAL["op_cost_per_row"],
        operating_limit=PORTAL["operating_limit"],
    )
    # Enough backlog to last the whole run at the ceiling (runs shorter than that stop early).
    count = ctx.size(int(model.events_per_s * 60 * 1.1), int(model.events_per_s * 20 * 1.1))
    fresh = await _drain(ctx, "throttled", count, duration, 0.0)
    _report_fresh(fresh, result)
    restarted = await _drain(ctx, "throttled-restart", count, duration, PRESPENT)
    _report_restart(restarted, result, duration)


def _report_fresh(run: Run, result: Result) -> None:
    start, steady, end = run.start, run.steady, run.end
    span = end.at - steady.at
    moved = end.consumed - steady.consumed
    rate = moved / span if span > 0 else 0.0
    requests = end.requests - steady.requests
    gets = _delta(end.calls, steady.calls, GET)
    page = max(float(DEFAULT_PAGE), moved / gets if gets else 0.0)
    processing = _processing(run, page)
    bound = ceiling(
        rate_limit=PORTAL["rate_limit"],
        op_cost_per_call=PORTAL["op_cost_per_call"],
        op_cost_per_row=PORTAL["op_cost_per_row"],
        operating_limit=PORTAL["operating_limit"],
        page=page,
        processing=processing,
    )
    steady_errors = {code: int(_delta(end.errors, steady.errors, code)) for code in LIMIT_ERRORS}
    total_errors = {code: int(end.errors.get(code, 0)) for code in LIMIT_ERRORS}
    op_rate = _delta(end.operating, steady.operating, GET) / span if span > 0 else 0.0
    batch_rate = _delta(end.operating, steady.operating, BATCH) / span if span > 0 else 0.0
    ratio = rate / bound.events_per_s if bound.events_per_s else None
    result.metrics.update(
        {
            "backlog": run.count,
            "consumed": end.consumed,
            "run_seconds": round(end.at - start.at, 1),
            "steady_seconds": round(span, 1),
            "steady_events_per_s": round(rate, 1),
            "overall_events_per_s": round(end.consumed / max(1e-9, end.at - start.at), 1),
            "events_per_rest_request": round(moved / requests, 1) if requests else None,
            "rest_requests_steady": requests,
            "reservations_steady": int(gets),
            "rows_per_reservation": round(page, 1),
            "ceiling_events_per_s": round(bound.events_per_s, 1),
            "ceiling_bound_by": bound.bound_by,
            "ratio_to_ceiling": None if ratio is None else round(ratio, 3),
            "get_operating_s_per_s": round(op_rate, 3),
            "batch_operating_s_per_s": round(batch_rate, 3),
            "get_processing_ms": round(processing.get(GET, 0.0) * 1000, 3),
            "bans": end.bans,
            **{f"steady_{code}": n for code, n in steady_errors.items()},
            **{f"total_{code}": n for code, n in total_errors.items()},
            "ceiling_terms": {k: round(v, 1) for k, v in bound.terms.items()},
        }
    )
    budget_rate = PORTAL["operating_limit"] / WINDOW_SECONDS
    if op_rate > budget_rate:
        left = PORTAL["operating_limit"] / op_rate  # from a fresh window
        result.notes.append(
            f"event.offline.get spends {op_rate:.2f} operating s/s (> {budget_rate:.1f}): "
            f"the budget would run out after ~{math.floor(left)} s"
        )
    result.check("ratio to ceiling", ratio, ">=", 0.9)
    result.check("bans (fresh budget)", float(end.bans), "<=", 0)
    result.check("limit errors in steady state", float(sum(steady_errors.values())), "<=", 0)


def _report_restart(run: Run, result: Result, duration: float) -> None:
    moved = run.end.consumed
    seconds = run.end.at - run.start.at
    page = float(DEFAULT_PAGE)
    per_get = PORTAL["op_cost_per_call"] + page * PORTAL["op_cost_per_row"]
    left = PORTAL["operating_limit"] - PRESPENT
    by_budget = left / per_get * page
    by_rate = PORTAL["rate_limit"] * (BATCH_COMMANDS // 2) * page * seconds
    allowed = min(by_budget, by_rate)
    share = moved / allowed if allowed else None
    result.metrics.update(
        {
            "restart_prespent_s": PRESPENT,
            "restart_seconds": round(seconds, 1),
            "restart_consumed": moved,
            "restart_allowed_by_budget": round(allowed),
            "restart_share_of_allowed": None if share is None else round(share, 3),
            "restart_bans": run.end.bans,
            "restart_get_operating_at_end": round(run.end.operating.get(GET, 0.0), 1),
        }
    )
    result.check("bans (restart, 395 s spent)", float(run.end.bans), "<=", 0)
    result.check("restart moves of what the budget left allows", share, ">=", 0.5)
