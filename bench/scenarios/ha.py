"""Scaled mode: three replicas on PostgreSQL, 24 portals, replicas killed, stopped and cut off.

Three ``bridge serve`` processes share a PostgreSQL database made for the run (dropped after);
one emulator farm serves 24 portals, each installed through a balancer in front of the
replicas, with events arriving on every portal all along (``EVENTS_PER_S`` each). Leases last
5 s and are renewed every half second (a claim waits for the next round); 64 shards. In turn:

1. shards even: 30 s after start, every shard held and the counts within 1 of each other;
2. rolling SIGTERM: each replica in turn stopped (and started again once it exited); for each
   of its portals, the time from the signal to the first reservation by the new owner, and
   every copy of an event the consumer gets twice while it lasts;
3. SIGKILL x 20: the owner of a randomly chosen portal (seeded) killed and started again; for
   every portal it held, the time from the kill to the new owner's first reservation;
4. cut off: one replica, started behind a TCP proxy to PostgreSQL, cut from it right after a
   renewal was seen in the lease rows. Its deadline is that renewal's expiry as the database
   wrote it (``now() + TTL`` when the statement ran: never earlier than the replica's own
   deadline, the monotonic moment it *sent* the renewal plus the TTL); its last call in the
   call log must come before the deadline + 0.5 s;
5. the end: events stop, and every event must reach the consumer, every portal's queue empty.

From the call log: once a higher epoch called for a portal, never a lower one again. From the
farm's stats: no ``invalid_grant`` (tokens live 60 s, so each portal refreshes several times
while its owners change), no rate-limit errors. A restarted replica comes back under a new
replica id (``r1-2``), as a new pod does: its shards are taken over at the lease's expiry, not
reclaimed under the same name at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aiormq.abc import DeliveredMessage

from bench import halog
from bench.context import Context
from bench.drainrun import EVENT
from bench.hacluster import Cluster, database
from bench.procs import Emulator
from bench.report import Result, percentile
from bridge.scaling.shards import shard_of

TITLE = "scaled mode: 3 replicas, 24 portals (kills, rolling stop, cut-off)"
PORTALS = 24
SHARDS = 64
TTL, RENEW = 5.0, 0.5
EVENTS_PER_S = 8  # per portal
TICK = 0.25
FARM = {"rate_limit": 2.0, "rate_burst": 50, "latency_ms": 20.0, "token_ttl": 60.0}


class Flow:
    """Events generated on every portal, and what the consumer got of them."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.generated = 0  # per portal
        self.copies: Counter[str] = Counter()  # message_id -> deliveries
        self.duplicate_at: list[float] = []  # monotonic arrival of each extra copy
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def on_message(self, message: DeliveredMessage) -> None:
        mid = str(message.header.properties.message_id)
        self.copies[mid] += 1
        if self.copies[mid] > 1:
            self.duplicate_at.append(time.monotonic())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        count = max(1, round(EVENTS_PER_S * TICK))
        while not self._stopping.is_set():
            body = {"generate": {"event": EVENT, "count": count, "start_id": self.generated + 1}}
            response = await self.emulator.http.post("/_farm/events", json=body)
            response.raise_for_status()
            self.generated += count
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TICK)

    async def stop(self) -> None:
        # Not cancelled: a request the farm took whose answer never came back would leave
        # events uncounted, and "lost" blind to as many.
        self._stopping.set()
        if self._task is not None:
            await self._task
        self._task = None

    def duplicates_between(self, start: float, end: float) -> int:
        return sum(1 for at in self.duplicate_at if start <= at < end)

    def unique_per_portal(self) -> Counter[str]:
        return Counter(mid.split(":", 1)[0] for mid in self.copies)


async def _farm(emulator: Emulator, path: str) -> Any:
    response = await emulator.http.get(f"/_farm/{path}")
    response.raise_for_status()
    return response.json()


async def _portals_of(cluster: Cluster, name: str, members: Sequence[str]) -> list[str]:
    shards = {lease.shard for lease in await cluster.leases() if lease.holder == name}
    return [m for m in members if shard_of(m, SHARDS) in shards]


async def run(ctx: Context, result: Result) -> None:
    kills = ctx.size(20, 3)
    settle = ctx.seconds(30.0, 15.0)
    rng = ctx.random("ha")
    result.metrics.update({"seed": ctx.seed, "portals": PORTALS, "shards": SHARDS})
    result.metrics.update({"lease_ttl_s": TTL, "lease_renew_s": RENEW})
    call_log = ctx.path("ha-calls.jsonl")
    ns = ctx.broker.namespace("ha")
    async with database("ha") as url:
        emulator = Emulator(
            ctx.path("ha-emulator.log"),
            **FARM,
            auto_bind=True,
            portals=PORTALS,
            call_log=str(call_log),
        )
        cluster: Cluster | None = None
        flow: Flow | None = None
        try:
            # The farm notifies the balancer, which exists before the replicas do.
            cluster = Cluster(url, {}, shards=SHARDS, logs=ctx.workdir)
            await cluster.open()
            emulator.config["handler_url"] = cluster.handler_url
            await emulator.start()
            listed = await _farm(emulator, "portals")
            members = [p["member_id"] for p in listed["portals"]]
            cluster.env.update(_env(listed, ns.url, ns.exchange_template, ns.unrouted_exchange))
            flow = Flow(emulator)
            consumer = await ns.consume(ns.exchange(EVENT))
            consumer.on_message = flow.on_message
            started = time.monotonic()
            await asyncio.gather(*(cluster.start(slot) for slot in range(3)))
            result.metrics["install_requests"] = await _install(emulator, members)
            flow.start()
            await _even_after(cluster, result, started, settle)
            tail = halog.Tail(call_log)
            stops = await _rolling_stop(cluster, flow, result, members, rng, tail)
            kill_log = await _kills(cluster, result, members, rng, kills, tail)
            cut = await _cut_off(cluster, result, members)
            await flow.stop()
            await _drain_to_end(emulator, flow, result, members)
            result.metrics["shards_at_end"] = str(sorted((await cluster.counts()).values()))
        finally:
            if flow is not None:
                await flow.stop()
            if cluster is not None:
                await cluster.close()
            await emulator.stop()
            await ns.delete()
    _analyse(halog.load(call_log), result, stops, kill_log, cut)


async def _install(emulator: Emulator, members: list[str]) -> int:
    """Install the application on every portal; the requests it took. The bridge rations
    installs (each costs an OAuth request) and answers 503 above the ration: try those again."""
    waiting, requests = list(members), 0
    for _ in range(60):
        statuses = {}
        for member in waiting:
            answer = await emulator.http.post("/_farm/install", json={"portal": member})
            statuses[member] = answer.raise_for_status().json()["installed"][0]["status"]
            requests += 1
        if any(status not in (200, 503) for status in statuses.values()):
            raise RuntimeError(f"installs answered {Counter(statuses.values())}")
        waiting = [m for m, status in statuses.items() if status != 200]
        if not waiting:
            return requests
        await asyncio.sleep(1.0)
    raise RuntimeError(f"{len(waiting)} portals still not installed after a minute")


def _env(listed: dict[str, Any], amqp: str, template: str, unrouted: str) -> dict[str, str]:
    return {
        "BRIDGE_AMQP_URL": amqp,
        "BRIDGE_EXCHANGE_TEMPLATE": template,
        "BRIDGE_UNROUTED_EXCHANGE": unrouted,
        "BRIDGE_CLIENT_ID": listed["client_id"],
        "BRIDGE_CLIENT_SECRET": listed["client_secret"],
        "BRIDGE_OAUTH_URL": listed["oauth_url"],
        "BRIDGE_SHARDS": str(SHARDS),
        "BRIDGE_LEASE_TTL": str(TTL),
        "BRIDGE_LEASE_RENEW": str(RENEW),
        "BRIDGE_POLL_INTERVAL": "5",
        "BRIDGE_LOG_LEVEL": "INFO",
    }


async def _even_after(cluster: Cluster, result: Result, started: float, settle: float) -> None:
    await asyncio.sleep(max(0.0, started + settle - time.monotonic()))
    counts = await cluster.counts()
    held = sum(counts.values())
    spread = max(counts.values()) - min(counts.values()) if counts else None
    result.metrics["shards_after_settle"] = str(sorted(counts.values()))
    result.metrics["settle_s"] = settle
    result.check(f"shard spread after {settle:.0f} s", spread if held == SHARDS else None, "<=", 1)


# One stop or kill: the wall-clock moment, the replica, and the portals it held then.
Hit = tuple[float, str, list[str]]


async def _taken_over(tail: halog.Tail, hit: Hit, within: float = 60.0) -> None:
    """Wait until every portal of ``hit`` has been reserved by a new owner (the next stop or
    kill must not fall on a takeover still under way: it would be counted in this one)."""
    at, name, portals = hit
    limit = time.monotonic() + within
    while time.monotonic() < limit:
        if tail.taken_over(after=at, portals=portals, not_by=name):
            return
        await asyncio.sleep(0.25)


async def _rolling_stop(
    cluster: Cluster, flow: Flow, result: Result, members: list[str], rng: Any, tail: halog.Tail
) -> list[Hit]:
    hits: list[Hit] = []
    began = time.monotonic()
    for slot in range(3):
        await cluster.wait_even(60)
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        name = cluster.names[slot]
        portals = await _portals_of(cluster, name, members)
        hits.append((cluster.signal(slot, signal.SIGTERM), name, portals))
        result.metrics.setdefault("sigterm_exit_codes", "")
        code = await cluster.wait_exit(slot)
        result.metrics["sigterm_exit_codes"] += f"{code} "
        await cluster.start(slot)
        await _taken_over(tail, hits[-1])
    await cluster.wait_even(60)
    await asyncio.sleep(2.0)  # a late duplicate would arrive now
    result.metrics["sigterm_stops"] = len(hits)
    result.metrics["sigterm_duplicates"] = flow.duplicates_between(began, time.monotonic())
    return hits


async def _kills(
    cluster: Cluster, result: Result, members: list[str], rng: Any, kills: int, tail: halog.Tail
) -> list[Hit]:
    hits: list[Hit] = []
    evened: list[float] = []
    for _ in range(kills):
        took = await cluster.wait_even(60)
        if took is not None and hits:
            evened.append(took)
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        portal = rng.choice(members)
        owner = next(
            (
                lease.holder
                for lease in await cluster.leases()
                if lease.shard == shard_of(portal, SHARDS)
            ),
            None,
        )
        if owner is None:
            continue
        slot = cluster.slot_of(owner)
        portals = await _portals_of(cluster, owner, members)
        hits.append((cluster.signal(slot, signal.SIGKILL), owner, portals))
        await cluster.wait_exit(slot)
        await cluster.start(slot)
        await _taken_over(tail, hits[-1])
    took = await cluster.wait_even(60)
    if took is not None:
        evened.append(took)
    result.metrics["kills"] = len(hits)
    if evened:
        result.metrics["even_wait_before_kill_s_max"] = round(max(evened), 1)
    return hits


async def _cut_off(cluster: Cluster, result: Result, members: list[str]) -> dict[str, Any]:
    slot = 0
    cluster.signal(slot, signal.SIGTERM)
    await cluster.wait_exit(slot)
    name = await cluster.start(slot, proxied=True)
    await cluster.wait_even(60)

    async def expiry() -> float:
        return max((x.expires for x in await cluster.leases() if x.holder == name), default=0.0)

    # Cut right after a renewal: the one seen is the last the replica got an answer to.
    seen = renewed = await expiry()
    for _ in range(250):  # renewals come every RENEW seconds: 5 s is plenty
        renewed = await expiry()
        if renewed != seen:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    proxy = cluster.proxies[name]
    portals = await _portals_of(cluster, name, members)
    proxy.pause()
    proxy.cut()
    cut_at = time.time()
    deadline = max(await expiry(), renewed)
    await asyncio.sleep(max(0.0, deadline - time.time()) + 4.0)
    resumed_at = time.time()
    proxy.resume()
    rejoined = await cluster.wait_even(45)
    result.metrics["cut_replica_rejoined_s"] = None if rejoined is None else round(rejoined, 1)
    return {
        "name": name,
        "cut_at": cut_at,
        "deadline": deadline,
        "resumed_at": resumed_at,
        "portals": portals,
    }


async def _drain_to_end(emulator: Emulator, flow: Flow, result: Result, members: list[str]) -> None:
    total = flow.generated * len(members)
    limit = time.monotonic() + 180
    queues: dict[str, Any] = {}
    while time.monotonic() < limit:
        queues = await _farm(emulator, "queues")
        empty = all(q["free"] == 0 and q["reserved"] == 0 for q in queues.values())
        if empty and len(flow.copies) >= total:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)
    stats = await _farm(emulator, "stats")
    unique = flow.unique_per_portal()
    lost = sum(max(0, flow.generated - unique.get(m, 0)) for m in members)
    left = sum(q["free"] + q["reserved"] for q in queues.values())
    result.metrics.update(
        {
            "events_generated": total,
            "events_consumed": sum(flow.copies.values()),
            "events_unique": len(flow.copies),
            "duplicates_total": sum(flow.copies.values()) - len(flow.copies),
            "left_in_farm_queues": left,
            "error_rows": sum(q["errors"] for q in queues.values()),
            "farm_calls": stats["totals"]["calls"],
            "invalid_grant": stats["totals"]["invalid_grant"],
            "rate_limited": stats["totals"]["rate_limited"],
            "time_limited": stats["totals"]["time_limited"],
        }
    )
    result.check("events lost", lost + left, "<=", 0)
    result.check("invalid_grant", stats["totals"]["invalid_grant"], "<=", 0)
    result.check("rate-limit errors", stats["totals"]["rate_limited"], "<=", 0)


def _takeovers(
    calls: list[halog.Call], hits: Sequence[Hit], detail: list[dict[str, Any]]
) -> tuple[list[float], int]:
    """Seconds to each affected portal's first reservation by a new owner; and how many had
    none at all. ``detail`` gets each hit's figures (for the JSON file)."""
    times: list[float] = []
    missing = 0
    for at, name, portals in hits:
        found = halog.first_reservations(calls, after=at, portals=portals, not_by=name)
        times.extend(t for t in found.values() if t is not None)
        missing += sum(1 for t in found.values() if t is None)
        detail.append(
            {"at": at, "replica": name, "portals": {m: _round(t) for m, t in found.items()}}
        )
    return times, missing


def _analyse(
    calls: list[halog.Call],
    result: Result,
    sigterms: list[Hit],
    kills: list[Hit],
    cut: dict[str, Any],
) -> None:
    result.metrics["sigterm_detail"] = []
    result.metrics["kill_detail"] = []
    handoffs, no_handoff = _takeovers(calls, sigterms, result.metrics["sigterm_detail"])
    result.metrics.update(
        {
            "sigterm_portals_measured": len(handoffs),
            "sigterm_portals_never_taken": no_handoff,
            "handoff_s_median": _round(statistics.median(handoffs) if handoffs else None),
            "handoff_s_max": _round(max(handoffs, default=None)),
        }
    )
    result.check("handoff after SIGTERM (max)", _worst(handoffs, no_handoff), "<=", 3.0, "s")
    result.check("duplicates in the rolling stop", result.metrics["sigterm_duplicates"], "<=", 0)

    takeovers, no_takeover = _takeovers(calls, kills, result.metrics["kill_detail"])
    result.metrics.update(
        {
            "kill_portals_measured": len(takeovers),
            "kill_portals_never_taken": no_takeover,
            "takeover_s_min": _round(min(takeovers, default=None)),
            "takeover_s_median": _round(statistics.median(takeovers) if takeovers else None),
            "takeover_s_p90": _round(percentile(takeovers, 90)),
            "takeover_s_max": _round(max(takeovers, default=None)),
        }
    )
    median = statistics.median(takeovers) if takeovers and not no_takeover else None
    result.check("takeover after SIGKILL (max)", _worst(takeovers, no_takeover), "<=", 8.0, "s")
    result.check("takeover after SIGKILL (median)", median, "<=", 6.5, "s")

    seen = halog.epochs(calls)
    result.metrics.update(
        {
            "calls_logged": len(calls),
            "portal_epochs_seen": seen.epochs_seen,
            "calls_without_epoch": seen.unlabelled,
        }
    )
    result.notes.extend(f"interleaved: {example}" for example in seen.examples)
    result.check("calls interleaving an older epoch", seen.interleaved, "<=", 0)

    # Until the link came back (then it may hold shards again, under new leases).
    name, deadline, resumed = cut["name"], cut["deadline"], cut["resumed_at"]
    last = halog.last_call(calls, name, before=resumed)
    result.metrics.update(
        {
            "cut_replica": name,
            "cut_renewal_to_cut_s": _round(cut["cut_at"] - (deadline - TTL)),
            "cut_calls_after_cut": halog.calls_between(calls, name, cut["cut_at"], resumed),
            "cut_link_back_after_deadline_s": _round(resumed - deadline),
            "cut_last_call_minus_deadline_s": _round(None if last is None else last - deadline),
        }
    )
    result.check(
        "cut-off replica's last call after its deadline",
        None if last is None else last - deadline,
        "<=",
        0.5,
        "s",
    )


def _worst(values: list[float], missing: int) -> float | None:
    """The largest value; infinity when some portal was never taken over at all."""
    if missing:
        return float("inf")
    return max(values, default=None)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
