"""Notification burst: authenticated ``ONOFFLINEEVENT`` from 20 concurrent clients.

The bridge runs against a portal with a real portal's request limit and an empty queue, its
startup pass done. One genuine notification is sent (the warm-up), then 20 concurrent
keep-alive connections replay that same notification 2,000 times, form-encoded as the emulator
sends them: a replayed notification, the flood that must cost no more than the portal's
sustained request rate. The client is the minimal one in ``bench.httpload``, not httpx: httpx's
own CPU cost would make it the bottleneck here.
Measured: notifications/s, p50/p99 response time, and the drain passes they started
(``bitrix24_bridge_drain_passes_total`` before and after, once it stops moving). Then the same
load against ``bench.bare_app`` (a Starlette app that only answers 200, same uvicorn options).
"""

from __future__ import annotations

import time

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
from bridge import phpquery

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


async def _warm(server: Served, body: bytes) -> None:
    # One request first, so neither side pays for imports or first-connection set-up.
    await send_load(server, body, 1, clients=1)


async def run(ctx: Context, result: Result) -> None:
    total = ctx.size(2_000, 500)
    emulator = Emulator(ctx.path("burst-emulator.log"), auto_bind=True)
    await emulator.start()
    ns = ctx.broker.namespace("burst")
    bridge = bare = None
    try:
        app = await emulator.app()
        env = await bridge_env(emulator, ns, ctx.path("burst-state.sqlite3"))
        bridge = bridge_process(env, ctx.path("burst-bridge.log"))
        bridge.start()
        await bridge.wait_live("/livez")
        await wait_first_pass(bridge)
        body = notification(app).encode()
        await _warm(bridge, body)
        before = await settle_metric(bridge, PASSES, quiet=1.0)
        load = await send_load(bridge, body, total, CLIENTS)
        after = await settle_metric(bridge, PASSES, quiet=2.0)
        await bridge.stop()
        bridge = None

        bare = bare_process(ctx.path("burst-bare.log"))
        bare.start()
        await bare.wait_live("/livez")
        await _warm(bare, body)
        baseline = await send_load(bare, body, total, CLIENTS)
    finally:
        for server in (bridge, bare):
            if server is not None:
                await server.stop()
        await emulator.stop()
        await ns.delete()

    ratio = load.per_s / baseline.per_s if baseline.per_s else None
    p99 = load.ms(99)
    passes = after - before
    result.metrics.update(
        {
            "notifications": total,
            "bridge_per_s": round(load.per_s, 1),
            "bridge_p50_ms": round(load.ms(50) or 0.0, 2),
            "bridge_p99_ms": round(p99 or 0.0, 2),
            "bridge_statuses": dict(load.statuses),
            "bridge_non_200": sum(n for code, n in load.statuses.items() if code != 200),
            "drain_passes_started": int(passes),
            "bare_per_s": round(baseline.per_s, 1),
            "bare_p50_ms": round(baseline.ms(50) or 0.0, 2),
            "bare_p99_ms": round(baseline.ms(99) or 0.0, 2),
            "ratio_bridge_to_bare": None if ratio is None else round(ratio, 3),
        }
    )
    result.check("bridge / bare notifications/s", ratio, ">=", 0.7)
    result.check("p99 response time", p99, "<=", 25, "ms")
    result.check("drain passes started", passes, "<=", 2)
