"""Notification burst: authenticated ``ONOFFLINEEVENT`` from 20 concurrent clients.

The bridge runs against a portal with a real portal's request limit and an empty queue, its
startup pass done. One genuine notification is sent (the warm-up), then 20 concurrent
keep-alive connections replay that same notification 2,000 times, form-encoded as the emulator
sends them: a replayed notification, the flood that must cost no more than the portal's
sustained request rate. The client is the minimal one in ``bench.httpload``, not httpx: httpx's
own CPU cost would make it the bottleneck here.
Measured: notifications/s, p50/p99 response time, and the drain passes they started
(``bitrix24_bridge_drain_passes_total`` before and after, once it stops moving); and the same
load against ``bench.bare_app`` (a Starlette app that only answers 200, same uvicorn options),
running beside the bridge, the two taking turns over several rounds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter

from bench.context import Context
from bench.httpload import Load, post_many
from bench.procs import (
    Emulator,
    Served,
    bare_process,
    bridge_env,
    bridge_process,
    settle_metric,
    wait_first_pass,
)
from bench.report import Result
from bridge.bitrix24 import phpquery

TITLE = "notification burst (20 clients)"
CLIENTS = 20
PASSES = "bitrix24_bridge_drain_passes_total"
FORM = "application/x-www-form-urlencoded"


def notification(app: dict[str, str]) -> str:
    """An ``ONOFFLINEEVENT`` body as the emulator builds one, stamped now."""
    form = {
        "event": "ONOFFLINEEVENT",
        "data": "",
        "ts": int(time.time()),
        "auth": {
            "domain": app["domain"],
            "client_endpoint": app["client_endpoint"],
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "member_id": app["member_id"],
            "application_token": app["application_token"],
            "status": "L",
        },
    }
    return phpquery.encode(form)


async def send_load(server: Served, body: bytes, total: int, clients: int) -> Load:
    return await post_many(
        server.port,
        "/bitrix24/events",
        lambda: body,
        total=total,
        clients=clients,
        content_type=FORM,
    )


_ALL_CPUS = os.sched_getaffinity(0)


def _cpu_split() -> tuple[set[int], set[int]]:
    """(the core for the server under load, the cores for the client); empty on one core."""
    cpus = sorted(_ALL_CPUS)
    if len(cpus) < 2:
        return set(), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


async def _warm(server: Served, body: bytes) -> None:
    # One request first, so neither side pays for imports or first-connection set-up.
    await send_load(server, body, 1, clients=1)


async def run(ctx: Context, result: Result) -> None:
    total = ctx.size(2_000, 500)
    # A round takes a fraction of a second, and on two cores shared with the broker, the
    # emulator and this client, single rounds vary by ±30 %. The bridge and the bare app run side
    # by side and take turns (ABBA order), and the medians are compared.
    rounds = ctx.size(5, 2)
    emulator = Emulator(ctx.path("burst-emulator.log"), auto_bind=True)
    await emulator.start()
    ns = ctx.broker.namespace("burst")
    bridge: Served | None = None
    bare: Served | None = None
    loads: dict[str, list[Load]] = {"bridge": [], "bare": []}
    passes: list[float] = []
    cpu: dict[str, list[float]] = {"bridge": [], "bare": []}
    try:
        app = await emulator.app()
        env = await bridge_env(emulator, ns, ctx.path("burst-state.sqlite3"))
        bridge = bridge_process(env, ctx.path("burst-bridge.log"))
        bare = bare_process(ctx.path("burst-bare.log"))
        bridge.start()
        bare.start()
        await bridge.wait_live("/livez")
        await bare.wait_live("/livez")
        server_cpus, client_cpus = _cpu_split()
        if server_cpus:
            # The servers on one core, this client on the rest: otherwise whether the client
            # shares the server's core decides a round's rate more than the server does.
            for server in (bridge, bare):
                server.pin(server_cpus)
            os.sched_setaffinity(0, client_cpus)
        await wait_first_pass(bridge)
        for round_ in range(rounds):
            # Each round is a new notification (stamped now), then replayed ``total`` times.
            body = notification(app).encode()
            await _warm(bare, body)
            await _warm(bridge, body)
            before = await settle_metric(bridge, PASSES, quiet=1.0)
            order = [("bridge", bridge), ("bare", bare)]
            for name, server in order if round_ % 2 == 0 else order[::-1]:
                cpu_before = server.cpu_seconds()
                loads[name].append(await send_load(server, body, total, CLIENTS))
                cpu[name].append((server.cpu_seconds() - cpu_before) / total * 1e6)
            passes.append(await settle_metric(bridge, PASSES, quiet=2.0) - before)
    finally:
        os.sched_setaffinity(0, _ALL_CPUS)
        for started in (bridge, bare):
            if started is not None:
                await started.stop()
        await emulator.stop()
        await ns.delete()

    bridge_rate = statistics.median(load.per_s for load in loads["bridge"])
    bare_rate = statistics.median(load.per_s for load in loads["bare"])
    ratio = bridge_rate / bare_rate if bare_rate else None
    latencies = Load(latencies=[t for load in loads["bridge"] for t in load.latencies])
    bare_latencies = Load(latencies=[t for load in loads["bare"] for t in load.latencies])
    statuses: Counter[int] = Counter()
    for load in loads["bridge"]:
        statuses.update(load.statuses)
    p99 = latencies.ms(99)
    most_passes = max(passes)
    result.metrics.update(
        {
            "notifications_per_round": total,
            "rounds": rounds,
            "bridge_per_s": round(bridge_rate, 1),
            "bridge_rounds_per_s": [round(load.per_s) for load in loads["bridge"]],
            "bridge_p50_ms": round(latencies.ms(50) or 0.0, 2),
            "bridge_p99_ms": round(p99 or 0.0, 2),
            "bridge_statuses": dict(statuses),
            "bridge_non_200": sum(n for code, n in statuses.items() if code != 200),
            "drain_passes_started": [int(n) for n in passes],
            "bare_per_s": round(bare_rate, 1),
            "bare_rounds_per_s": [round(load.per_s) for load in loads["bare"]],
            "bare_p50_ms": round(bare_latencies.ms(50) or 0.0, 2),
            "bare_p99_ms": round(bare_latencies.ms(99) or 0.0, 2),
            "ratio_bridge_to_bare": None if ratio is None else round(ratio, 3),
            # Server CPU time per request (clock-tick resolution): steadier than the rates.
            "bridge_cpu_us_per_request": round(statistics.median(cpu["bridge"])),
            "bare_cpu_us_per_request": round(statistics.median(cpu["bare"])),
        }
    )
    result.check("bridge / bare notifications/s (medians)", ratio, ">=", 0.7)
    result.check("p99 response time", p99, "<=", 25, "ms")
    result.check("drain passes started (most in a round)", most_passes, "<=", 2)
