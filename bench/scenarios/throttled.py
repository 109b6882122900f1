"""Throttled throughput: a portal with a real portal's limits, the bridge with its defaults.

The emulator: leaky bucket 2 requests/s with a burst of 50, 20 ms latency per request, and per
method an operating-time budget of B = 480 s per sliding 600 s, charged per call
``op_cost_per_call`` (c = 10 ms) plus ``op_cost_per_row`` (r = 0.3 ms) per row read, plus the
call's real processing time (p). The bridge runs with its default ``BRIDGE_RATE_LIMIT=2`` and
``BRIDGE_RATE_BURST=50``.

The ceiling these limits imply, for pages of L events (L = the larger of ``BRIDGE_PAGE_SIZE``'s
default 50 and the rows per reservation observed):

* operating time of ``event.offline.get``: a method may use B / 600 = 0.8 s per second, and
  reserving a page costs c + L·r + p_get, so at most ``0.8 / (c + L·r + p_get) · L`` events/s
  (L = 50, p ≈ 0: 0.8 / 0.025 · 50 = 1,600 events/s);
* operating time of ``event.offline.clear`` (no rows read): ``0.8 / (c + p_clear) · L``
  (4,000 events/s);
* operating time of ``batch`` itself, one call per request carrying 25 pages:
  ``0.8 / (c + p_batch) · 25 · L``;
* request rate: one ``batch`` of at most 50 commands holds 25 reservations and the 25 clears
  that go with them, so at most ``rate_limit · 25 · L`` = 2 · 25 · 50 = 2,500 events/s.

The ceiling is the smallest of these. p_get, p_clear and p_batch are measured: the operating
time the emulator charged in the steady window minus the modelled part, per call.

The budget is a ten-minute window, so a run of a minute can spend faster than 0.8 s/s without
an error; the operating seconds used per second are reported to show whether the pace would
hold. Steady state excludes the first ten seconds (five with ``--quick``: the client's and the
portal's burst) and the tail once 98% of the backlog has arrived. The backlog is sized to last
the whole run at the model's ceiling (105,600 events for 60 s; 35,200 for 20 s with
``--quick``).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from bench.context import Context
from bench.drainrun import EVENT
from bench.procs import Emulator, bridge_env, bridge_process, free_port, wait_first_pass
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
    "operating_budget": 480.0,
}


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
    operating_budget: float,
    page: float = DEFAULT_PAGE,
    processing: dict[str, float] | None = None,
) -> Ceiling:
    """The events/s the portal's limits allow at ``page`` events per reservation (see above)."""
    p = processing or {}
    per_second = operating_budget / WINDOW_SECONDS
    pages_per_batch = BATCH_COMMANDS // 2
    terms = {
        "get operating time": per_second
        / (op_cost_per_call + page * op_cost_per_row + p.get(GET, 0.0))
        * page,
        "clear operating time": per_second / (op_cost_per_call + p.get(CLEAR, 0.0)) * page,
        "batch operating time": per_second
        / (op_cost_per_call + p.get(BATCH, 0.0))
        * pages_per_batch
        * page,
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


async def _snapshot(emulator: Emulator, consumed: int) -> Snapshot:
    stats: dict[str, Any] = await emulator.stats()
    return Snapshot(
        time.monotonic(),
        consumed,
        await emulator.requests(),
        dict(stats["calls"]),
        dict(stats["errors"]),
        {k: float(v) for k, v in stats["operating"].items()},
    )


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
    return float(after.get(key, 0)) - float(before.get(key, 0))


async def run(ctx: Context, result: Result) -> None:
    duration = ctx.seconds(60.0, 20.0)
    warmup = min(10.0, duration / 4)
    # Enough backlog to last the whole run at the ceiling (runs shorter than that stop early).
    model = ceiling(
        rate_limit=PORTAL["rate_limit"],
        op_cost_per_call=PORTAL["op_cost_per_call"],
        op_cost_per_row=PORTAL["op_cost_per_row"],
        operating_budget=PORTAL["operating_budget"],
    )
    count = ctx.size(int(model.events_per_s * 60 * 1.1), int(model.events_per_s * 20 * 1.1))
    port = free_port()
    emulator = Emulator(
        ctx.path("throttled-emulator.log"),
        **PORTAL,
        auto_bind=True,
        min_timeout=0,
        handler_url=f"http://127.0.0.1:{port}/bitrix24/events",
    )
    await emulator.start()
    ns = ctx.broker.namespace("throttled")
    bridge = None
    try:
        consumer = await ns.consume(ns.exchange(EVENT))
        env = await bridge_env(emulator, ns, ctx.path("throttled-state.sqlite3"))
        bridge = bridge_process(env, ctx.path("throttled-bridge.log"), port=port)
        bridge.start()
        await bridge.wait_live("/livez")
        await wait_first_pass(bridge)
        await emulator.generate(EVENT, count)
        start = await _snapshot(emulator, 0)
        steady: Snapshot | None = None
        end: Snapshot | None = None
        while time.monotonic() - start.at < duration:
            bridge.check()
            await asyncio.sleep(0.25)
            now = time.monotonic() - start.at
            if steady is None and now >= warmup:
                steady = await _snapshot(emulator, consumer.count)
            if consumer.count >= 0.98 * count:
                break
        end = await _snapshot(emulator, consumer.count)
        assert steady is not None or end is not None
        steady = steady or start
    finally:
        if bridge is not None:
            await bridge.stop()
        await emulator.stop()
        await ns.delete()

    span = end.at - steady.at
    moved = end.consumed - steady.consumed
    rate = moved / span if span > 0 else 0.0
    requests = end.requests - steady.requests
    gets = _delta(end.calls, steady.calls, GET)
    page = max(float(DEFAULT_PAGE), moved / gets if gets else 0.0)
    processing = {}
    for method, modelled_rows in ((GET, page), (CLEAR, 0.0), (BATCH, 0.0)):
        calls = _delta(end.calls, steady.calls, method)
        if calls > 0:
            charged = _delta(end.operating, steady.operating, method) / calls
            modelled = PORTAL["op_cost_per_call"] + modelled_rows * PORTAL["op_cost_per_row"]
            processing[method] = max(0.0, charged - modelled)
    bound = ceiling(
        rate_limit=PORTAL["rate_limit"],
        op_cost_per_call=PORTAL["op_cost_per_call"],
        op_cost_per_row=PORTAL["op_cost_per_row"],
        operating_budget=PORTAL["operating_budget"],
        page=page,
        processing=processing,
    )
    steady_errors = {code: int(_delta(end.errors, steady.errors, code)) for code in LIMIT_ERRORS}
    total_errors = {code: int(end.errors.get(code, 0)) for code in LIMIT_ERRORS}
    op_rate = _delta(end.operating, steady.operating, GET) / span if span > 0 else 0.0
    ratio = rate / bound.events_per_s if bound.events_per_s else None
    result.metrics.update(
        {
            "backlog": count,
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
            "get_processing_ms": round(processing.get(GET, 0.0) * 1000, 3),
            **{f"steady_{code}": n for code, n in steady_errors.items()},
            **{f"total_{code}": n for code, n in total_errors.items()},
            "ceiling_terms": {k: round(v, 1) for k, v in bound.terms.items()},
        }
    )
    budget_rate = PORTAL["operating_budget"] / WINDOW_SECONDS
    if op_rate > budget_rate:
        left = PORTAL["operating_budget"] / op_rate  # from a fresh window
        result.notes.append(
            f"event.offline.get spends {op_rate:.2f} operating s/s (> {budget_rate:.1f}): "
            f"the budget would run out after ~{math.floor(left)} s"
        )
    result.check("ratio to ceiling", ratio, ">=", 0.9)
    result.check("steady events/s", rate, ">=", 1000, "ev/s")
    result.check("limit errors in steady state", float(sum(steady_errors.values())), "<=", 0)
