"""The Diadoc source end to end: emulator over HTTP, the real RabbitMQ, the state file.

The invariant checked throughout: every event at or before the stored cursor reached the broker,
and every event of the feed is published at least once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import pytest
from prometheus_client import CollectorRegistry

from bridge.amqp.publisher import AmqpPublisher
from bridge.core.errors import NotConfirmed, TransientError
from bridge.diadoc.cursor import Cursor
from bridge.diadoc.delivery import SOURCE
from bridge.diadoc.metrics import diadoc_metrics
from bridge.diadoc.settings import load_diadoc_settings
from bridge.diadoc.source import DocflowFeed, FeedOptions
from bridge.diadoc.ticks import to_unix
from bridge.diadoc.wiring import PolledDrainer, diadoc_drainers, diadoc_status
from bridge.emulators.diadoc import DiadocEmulator, DiadocEmulatorServer, FaultRule
from bridge.emulators.diadoc.events import DEFECTS
from bridge.metrics import Metrics
from bridge.state import State
from tests.diadoc.harness import emulated_client
from tests.harness import until
from tests.plugins.broker import AmqpNamespace, Collector
from tests.plugins.tcpproxy import TcpProxy
from tests.waiting import holds

BOX = "box-a"


@pytest.fixture
def diadoc() -> Iterator[DiadocEmulatorServer]:
    with DiadocEmulatorServer(DiadocEmulator((BOX, "box-b"))) as server:
        yield server


@dataclass
class Rig:
    """One bridge "process": its own state connection, publisher and HTTP client."""

    state: State
    publisher: AmqpPublisher
    http: httpx.AsyncClient
    feed: DocflowFeed
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"bitrix24_bridge_diadoc_{name}", labels)

    async def close(self) -> None:
        await self.feed.client.auth.settle()
        await self.publisher.close()
        await self.http.aclose()
        await self.state.close()

    async def cursor(self) -> Cursor:
        raw = await self.state.cursor(SOURCE, self.feed.box_id)
        assert raw is not None
        return Cursor.loads(raw)


@pytest.fixture
def bootstrap(diadoc: DiadocEmulatorServer) -> str:
    return diadoc.model.issue_refresh_token()


class MakeRig(Protocol):
    async def __call__(
        self,
        *,
        amqp_url: str | None = None,
        box: str = BOX,
        page_limit: int = 5,
        clock: Callable[[], float] = time.time,
        department_id: str | None = None,
        **options: float,
    ) -> Rig: ...


@pytest.fixture
def make_rig(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, tmp_path: Path, bootstrap: str
) -> MakeRig:
    async def make(
        *,
        amqp_url: str | None = None,
        box: str = BOX,
        page_limit: int = 5,
        clock: Callable[[], float] = time.time,
        department_id: str | None = None,
        **options: float,
    ) -> Rig:
        state = await State.open(str(tmp_path / "state.sqlite3"))
        publisher = AmqpPublisher(
            amqp_url or amqp_ns.url, unrouted_exchange=amqp_ns.unrouted_exchange, confirm_timeout=5
        )
        await publisher.start()
        http = httpx.AsyncClient()
        registry = CollectorRegistry()
        metrics = diadoc_metrics(registry)
        client = emulated_client(diadoc, state, http, bootstrap, registry=registry)
        feed = DocflowFeed(
            box,
            client=client,
            state=state,
            publisher=publisher,
            metrics=metrics,
            options=FeedOptions(
                exchange=exchange(amqp_ns),
                page_limit=page_limit,
                rescan_window=float(options.get("rescan_window", 86_400)),
                rescan_interval=float(options.get("rescan_interval", 300)),
                start_lookback=float(options.get("start_lookback", 3600)),
                seen_keep=int(options.get("seen_keep", 100_000)),
                department_id=department_id,
            ),
            clock=clock,
        )
        return Rig(state, publisher, http, feed, registry)

    return make


def exchange(ns: AmqpNamespace) -> str:
    return f"{ns.prefix}.diadoc.events"


async def consume(ns: AmqpNamespace, key: str = "#") -> Collector:
    return await ns.consume(exchange(ns), key)


def keys(diadoc: DiadocEmulatorServer, box: str = BOX) -> set[str]:
    """Every publishable event of the box (malformed ones are recorded, not published)."""
    return {e.key for e in diadoc.model.events(box) if e.defect is None}


async def drain(rig: Rig, passes: int = 1) -> None:
    for _ in range(passes):
        await rig.feed.run_pass(full_check=False)


async def assert_cursor_behind_delivered(
    rig: Rig | Cursor, diadoc: DiadocEmulatorServer, delivered: set[str | None], box: str = BOX
) -> None:
    cursor = rig if isinstance(rig, Cursor) else await rig.cursor()
    if cursor.after is None:
        return
    events = diadoc.model.events(box)
    # The last event with that key: a tie shares one.
    position = max(i for i, e in enumerate(events) if e.index_key == cursor.after)
    behind = {e.key for e in events[: position + 1] if e.defect is None}
    assert behind <= delivered, "the cursor passed an event the broker never got"


# -- the happy path ---------------------------------------------------------------------------


async def test_publishes_every_event_with_headers_and_routing(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig()
    try:
        invoices = await consume(amqp_ns, f"{BOX}.Invoice")
        everything = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=6, documents=2)  # one EventId, two documents each
        diadoc.model.add_events(BOX, count=2, document_type="Invoice")
        report = await rig.feed.run_pass(full_check=True)
        assert report.published == 14
        messages = await everything.wait_for(14)
        assert {m.message_id for m in messages} == keys(diadoc)
        await invoices.wait_for(2)
        first = messages[0]
        event = diadoc.model.events(BOX)[0]
        assert first.message_id == f"{event.event_id}:{event.entity_id}"
        assert first.headers["x-diadoc-box-id"] == BOX
        assert first.headers["x-diadoc-event-id"] == event.event_id
        assert first.headers["x-diadoc-message-id"] == event.message_id
        assert first.headers["x-diadoc-entity-id"] == event.entity_id
        assert first.routing_key == f"{BOX}.UniversalTransferDocument"
        assert json.loads(first.body)["IndexKey"] == event.index_key
        assert (await rig.cursor()).after == diadoc.model.events(BOX)[-1].index_key
        await drain(rig)  # nothing new: nothing published again
        assert len(await everything.settle(quiet=0.3)) == 14
    finally:
        await rig.close()


# -- late events and duplicates ---------------------------------------------------------------


async def test_late_events_inside_the_window_are_published(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(rescan_window=3600, rescan_interval=0.01)
    try:
        collector = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=4)
        await drain(rig)
        await collector.wait_for(4)
        cursor = await rig.cursor()
        late = diadoc.model.add_events(BOX, age_s=1200)  # filed 20 minutes late, behind
        too_late = diadoc.model.add_events(BOX, age_s=7200)  # outside the window
        await until(holds(rig.feed._rescan_due), "the re-scan interval to pass")
        report = await rig.feed.run_pass(full_check=False)
        assert report.published == 1
        messages = await collector.settle(quiet=0.3)
        ids = [m.message_id for m in messages]
        assert late[0].key in ids
        assert too_late[0].key not in ids  # the documented limit of the window
        assert (await rig.cursor()).after == cursor.after  # the re-scan never moves the cursor
    finally:
        await rig.close()


async def test_a_restart_rescans_at_once(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(rescan_interval=3600)
    collector = await consume(amqp_ns)
    diadoc.model.add_events(BOX, count=3)
    await drain(rig)
    late = diadoc.model.add_events(BOX, age_s=300)
    await drain(rig)  # the next re-scan is an hour away in this process
    await rig.close()
    assert late[0].key not in {m.message_id for m in await collector.settle(quiet=0.3)}
    rig = await make_rig(rescan_interval=3600)
    try:
        await drain(rig)
        messages = await collector.settle(quiet=0.3)
        assert late[0].key in {m.message_id for m in messages}
        assert len(messages) == 4
    finally:
        await rig.close()


async def test_duplicates_are_not_published_again(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(rescan_interval=0.01)
    try:
        collector = await consume(amqp_ns)
        added = diadoc.model.add_events(BOX, count=3)
        await drain(rig)
        diadoc.model.duplicate(BOX, added[0].key)  # again at the head of the feed
        diadoc.model.duplicate(BOX)
        await until(holds(rig.feed._rescan_due), "the re-scan interval to pass")
        await drain(rig, passes=2)
        messages = await collector.settle(quiet=0.3)
        assert sorted(m.message_id or "" for m in messages) == sorted(e.key for e in added)
        assert (await rig.cursor()).after == diadoc.model.events(BOX)[-1].index_key
    finally:
        await rig.close()


async def test_seen_set_is_bounded(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=50, seen_keep=10, rescan_window=0)
    try:
        diadoc.model.add_events(BOX, count=25)
        await drain(rig)
        ids = [e.key for e in diadoc.model.events(BOX)]
        remembered = await rig.state.seen_filter(SOURCE, BOX, ids)
        assert remembered == set(ids[-10:])
    finally:
        await rig.close()


async def test_the_rescan_reads_bare_events_and_fetches_documents_only_for_late_ones(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=100, rescan_interval=0.01, start_lookback=86_400)
    try:
        invoices = await consume(amqp_ns, f"{BOX}.Invoice")
        diadoc.model.add_events(BOX, count=150)
        await drain(rig)  # the first pass re-scans the (known) window: no document fetched
        first = [r["body"] for r in diadoc.model.requests]
        late = diadoc.model.add_events(BOX, age_s=6 * 3600, document_type="Invoice", documents=2)
        await until(holds(rig.feed._rescan_due), "the re-scan interval to pass")
        report = await rig.feed.run_pass(full_check=False)
        assert report.published == 2
        messages = await invoices.wait_for(2)  # routed by their type: the document was fetched
        assert {m.message_id for m in messages} == {e.key for e in late}
        assert json.loads(messages[0].body)["Document"]["DocumentInfo"]["FullVersion"]
        assert rig.sample("late_events_total", box=BOX) == 2
        second = [r["body"] for r in diadoc.model.requests[len(first) :]]
    finally:
        await rig.close()
    bodies = first + second
    assert all("SortDirection" not in b["Filter"] for b in bodies)  # ascending is the default
    assert all(not b["InjectEntityContent"] for b in bodies)
    assert all(not b["PopulatePreviousDocumentStates"] for b in bodies)
    scans = [b for b in second if not b["PopulateDocuments"]]
    assert scans
    assert all(b["Limit"] == 100 for b in scans)
    window = scans[0]["Filter"]
    assert window["ToTimestamp"]["Ticks"] - window["FromTimestamp"]["Ticks"] > 86_000 * 10**7
    # One populated read for the late change (both documents share its timestamp), one instant.
    fetched = [b for b in second if b["PopulateDocuments"] and "AfterIndexKey" not in b]
    fetched = [b for b in fetched if b["Filter"]["FromTimestamp"]["Ticks"] < late[0].ticks]
    assert [
        (b["Filter"]["FromTimestamp"]["Ticks"], b["Filter"]["ToTimestamp"]["Ticks"])
        for b in fetched
    ] == [(late[0].ticks - 1, late[0].ticks + 1)]


async def test_the_rescan_never_reads_before_the_box_started(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    collector = await consume(amqp_ns)
    older = diadoc.model.add_events(BOX, count=3, age_s=5 * 3600)  # before the start point
    rig: Rig = await make_rig(rescan_interval=0.01, start_lookback=3600)
    try:
        recent = diadoc.model.add_events(BOX, count=2, age_s=60)
        await drain(rig, passes=2)
        ids = {m.message_id for m in await collector.settle(quiet=0.3)}
    finally:
        await rig.close()
    assert ids == {e.key for e in recent}
    assert not ids & {e.key for e in older}


# -- ties: events sharing one IndexKey ----------------------------------------------------------


async def test_ties_at_page_boundaries_lose_and_duplicate_nothing(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    """A tie cut by a page boundary is read again whole; the seen-set keeps its members from
    being published twice (diadoc/diadocsdk-csharp issue 1083 is the real feed's tie)."""
    rig: Rig = await make_rig(page_limit=5, rescan_window=0)  # the cursor alone
    try:
        collector = await consume(amqp_ns)
        for size in (1, 3, 4, 2, 5, 7, 1, 6, 2):  # 5 fills a page; 6 and 7 overflow it
            diadoc.model.add_events(BOX, count=size, tied=size > 1)
        await drain(rig)
        diadoc.model.add_events(BOX, count=4, tied=True)  # a tie arriving between passes
        await drain(rig)
        counts = Counter(m.message_id for m in await collector.settle(quiet=0.3))
        assert set(counts) == keys(diadoc)
        assert set(counts.values()) == {1}  # not one duplicate
        assert (await rig.cursor()).after == diadoc.model.events(BOX)[-1].index_key
        assert rig.sample("duplicates_skipped_total", box=BOX) in (None, 0)
        assert rig.sample("tie_overflows_total", box=BOX) in (None, 0)
        # A tie larger than the page is read again at the largest page, published alone (a
        # crash re-publishes no more than it), and the feed goes on after it at the usual size.
        reads = [(r["body"]["Limit"], r["after"]) for r in diadoc.model.requests]
        widened = [i for i, (limit, _) in enumerate(reads) if limit == 100]
        assert [reads[i + 1] for i in widened] == [(5, tie_key(diadoc, n)) for n in (5, 7, 6)]
    finally:
        await rig.close()


def tie_key(diadoc: DiadocEmulatorServer, size: int) -> str:
    """The IndexKey shared by the box's (first) tie of ``size`` events."""
    groups = Counter(e.index_key for e in diadoc.model.events(BOX))
    return next(k for k, n in groups.items() if n == size)


async def test_a_late_tie_cut_by_a_rescan_page_is_read_whole(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=100, rescan_interval=0.01, start_lookback=86_400)
    try:
        collector = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=98, age_s=3 * 3600)
        diadoc.model.add_events(BOX)  # the cursor ends here, now
        await drain(rig)
        # Filed late, behind the cursor, and across the re-scan's first page boundary (100).
        tie = diadoc.model.add_events(BOX, count=5, tied=True, age_s=2 * 3600)
        await until(holds(rig.feed._rescan_due), "the re-scan interval to pass")
        await drain(rig)
        counts = Counter(m.message_id for m in await collector.settle(quiet=0.3))
        assert {e.key for e in tie} <= set(counts)
        assert set(counts) == keys(diadoc)
        assert set(counts.values()) == {1}
    finally:
        await rig.close()


async def test_a_tie_larger_than_the_largest_page_is_counted(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=10, rescan_window=0)
    try:
        collector = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=101, tied=True)
        after = diadoc.model.add_events(BOX, count=3)
        await drain(rig)
        ids = {m.message_id for m in await collector.settle(quiet=0.3)}
        # The documented bound: the API itself cannot page inside one IndexKey, so 100 of the
        # 101 are read; the box goes on and says so.
        assert len(ids) == 101 + 3 - 1
        assert {e.key for e in after} <= ids
        assert rig.sample("tie_overflows_total", box=BOX) == 1
    finally:
        await rig.close()


# -- malformed events -----------------------------------------------------------------------


async def test_a_malformed_event_is_recorded_counted_and_passed(
    diadoc: DiadocEmulatorServer,
    amqp_ns: AmqpNamespace,
    make_rig: MakeRig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="bridge.diadoc.delivery")
    rig: Rig = await make_rig(page_limit=4, rescan_interval=0.01)
    try:
        collector = await consume(amqp_ns)
        good = diadoc.model.add_events(BOX, count=3)
        bad = diadoc.model.add_events(BOX, defect="no_event_id")
        good += diadoc.model.add_events(BOX, count=3)
        bad += diadoc.model.add_events(BOX, defect="bad_timestamp")
        report = await rig.feed.run_pass(full_check=False)
        assert report.published == 6
        # The cursor passed both: the box is not frozen behind them.
        assert (await rig.cursor()).after == bad[-1].index_key
        good += diadoc.model.add_events(BOX, count=2)
        await until(holds(rig.feed._rescan_due), "the re-scan interval to pass")
        await drain(rig, passes=2)  # read again by the re-scans: recorded and counted once
        ids = {m.message_id for m in await collector.settle(quiet=0.3)}
        assert ids == {e.key for e in good}
        parked = await rig.state.parked(SOURCE)
        assert [r.key for r in parked] == [BOX, BOX]
        assert [r.ref.split(":")[0] for r in parked] == [e.index_key for e in bad]
        assert "no EventId" in parked[0].reason
        assert json.loads(parked[1].payload)["Timestamp"] == "yesterday"
        assert rig.sample("malformed_events_total", box=BOX) == 2
        logged = [r for r in caplog.records if "malformed" in r.getMessage()]
        assert len(logged) == 2
    finally:
        await rig.close()


@pytest.mark.parametrize("defect", ["no_index_key", "not_an_object"])
async def test_a_malformed_event_without_a_place_does_not_stall_the_feed(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig, defect: str
) -> None:
    rig: Rig = await make_rig(page_limit=3, rescan_window=0)
    try:
        collector = await consume(amqp_ns)
        before = diadoc.model.add_events(BOX, count=2)
        diadoc.model.add_events(BOX, defect=defect)  # the last event of the feed, keyless
        await drain(rig)
        after = diadoc.model.add_events(BOX, count=4)
        await drain(rig)
        ids = {m.message_id for m in await collector.settle(quiet=0.3)}
        assert ids == {e.key for e in before + after}
        assert len(await rig.state.parked(SOURCE)) == 1
    finally:
        await rig.close()


# -- document type, department ----------------------------------------------------------------


async def test_events_are_routed_by_the_type_kontur_puts_in_full_version(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig()
    try:
        utd = await consume(amqp_ns, "*.UniversalTransferDocument")
        unknown = await consume(amqp_ns, "*.unknown")
        diadoc.model.add_events(BOX, count=3)
        await drain(rig)
        assert len(await utd.wait_for(3)) == 3
        assert await unknown.settle(quiet=0.3) == []
    finally:
        await rig.close()


async def test_a_department_limited_account_reads_its_department(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    diadoc.model.add_box("box-d", department="dep-1")
    rig: Rig = await make_rig(box="box-d", department_id="dep-1")
    try:
        collector = await consume(amqp_ns)
        mine = diadoc.model.add_events("box-d", count=3, department="dep-1")
        diadoc.model.add_events("box-d", count=2, department="dep-2")
        await drain(rig)
        assert {m.message_id for m in await collector.settle(quiet=0.3)} == {e.key for e in mine}
        assert {r["body"]["DepartmentId"] for r in diadoc.model.requests} == {"dep-1"}
    finally:
        await rig.close()


# -- lag, back-off, stopping ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_the_lag_grows_during_an_outage(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    clock = Clock()
    rig: Rig = await make_rig(clock=clock, rescan_window=0)
    try:
        diadoc.model.add_events(BOX, count=3)
        await drain(rig)
        caught_up = clock.now
        assert rig.sample("lag_seconds", box=BOX) == 0
        assert rig.sample("caught_up_timestamp_seconds", box=BOX) == caught_up
        assert rig.sample("last_answer_timestamp_seconds", box=BOX) == caught_up
        event_ts = to_unix(diadoc.model.events(BOX)[-1].ticks)
        assert rig.sample("last_event_timestamp_seconds", box=BOX) == pytest.approx(event_ts)
        diadoc.model.add_faults([FaultRule(status=503, count=1000)])  # Diadoc is down
        clock.now += 600
        with pytest.raises(TransientError):
            await drain(rig)
        assert rig.sample("lag_seconds", box=BOX) == 600
        assert rig.sample("caught_up_timestamp_seconds", box=BOX) == caught_up
        assert rig.sample("last_answer_timestamp_seconds", box=BOX) == caught_up
    finally:
        await rig.close()


async def test_a_new_process_counts_the_lag_from_the_last_catch_up_on_record(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    clock = Clock()
    rig: Rig = await make_rig(clock=clock, rescan_window=0)
    await drain(rig)
    caught_up = clock.now
    await rig.close()
    clock.now += 900
    diadoc.model.add_faults([FaultRule(status=500, count=1000)])
    rig = await make_rig(clock=clock, rescan_window=0)
    try:
        with pytest.raises(TransientError):
            await drain(rig)
        assert rig.sample("caught_up_timestamp_seconds", box=BOX) == caught_up
        assert rig.sample("lag_seconds", box=BOX) == 900
    finally:
        await rig.close()


async def test_retry_after_sets_the_box_back_off(
    diadoc: DiadocEmulatorServer,
    amqp_ns: AmqpNamespace,
    make_rig: MakeRig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.core.drainer")
    rig: Rig = await make_rig()
    diadoc.model.add_faults([FaultRule(status=503, retry_after=120)])
    drainer = PolledDrainer(rig.feed, metrics=Metrics(), interval=60, backoff_base=0.01)
    drainer.start()
    try:

        def scheduled() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "drain retry scheduled"]

        await until(holds(scheduled), "a scheduled retry", timeout=10)
        assert scheduled()[0].__dict__["delay_s"] >= 120  # a logging extra
        assert diadoc.model.counters()["statuses"] == {"503": 1}
        assert drainer.stopped is None
    finally:
        await drainer.stop(1)
        await rig.close()


@pytest.mark.parametrize(("status", "why"), [(404, "BRIDGE_DIADOC_API_VERSION"), (415, "type")])
async def test_404_and_415_stop_the_box_with_a_reason(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig, status: int, why: str
) -> None:
    rig: Rig = await make_rig()
    diadoc.model.add_faults([FaultRule(status=status, error_code="Http.Refused")])
    metrics = Metrics()
    drainer = PolledDrainer(rig.feed, metrics=metrics, interval=60, backoff_base=0.01)
    drainer.start()
    try:
        await until(holds(lambda: drainer.stopped is not None), "the box to stop", timeout=10)
        assert f"HTTP {status}" in (drainer.stopped or "")
        assert why in (drainer.stopped or "")
        stopped = metrics.registry.get_sample_value(
            "bitrix24_bridge_portal_stopped", {"portal": f"diadoc:{BOX}"}
        )
        assert stopped == 1
        assert diadoc.model.counters()["requests"] == 1  # not retried
    finally:
        await drainer.stop(1)
        await rig.close()


# -- the cursor never passes an unconfirmed event ---------------------------------------------


async def test_nacked_events_hold_the_cursor(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=5)
    try:
        collector = await consume(amqp_ns)
        # A full queue that rejects publishes makes the broker nack the rest of the page.
        full = await amqp_ns.declare_queue(
            exchange(amqp_ns), "#", arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
        )
        diadoc.model.add_events(BOX, count=12)
        with pytest.raises(NotConfirmed):
            await drain(rig)
        assert (await rig.cursor()).after is None  # not even the first page was passed
        await assert_cursor_behind_delivered(
            rig, diadoc, {m.message_id for m in await collector.settle(quiet=0.3)}
        )
        channel = await amqp_ns.channel()
        await channel.queue_delete(full)
        await drain(rig)
        messages = await collector.settle(quiet=0.3)
        assert {m.message_id for m in messages} == keys(diadoc)
        # The three confirmed before the nack were remembered and not published again; the
        # two nacked ones (which the other queue did get) came again: at-least-once.
        counts = Counter(m.message_id for m in messages)
        first_page = [e.key for e in diadoc.model.events(BOX)[:5]]
        assert [counts[k] for k in first_page] == [1, 1, 1, 2, 2]
        assert sum(counts.values()) == 14
        assert (await rig.cursor()).after == diadoc.model.events(BOX)[-1].index_key
    finally:
        await rig.close()


async def test_a_cut_connection_holds_the_cursor(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig, amqp_proxy: TcpProxy
) -> None:
    rig: Rig = await make_rig(amqp_url=amqp_proxy.url(amqp_ns.url), page_limit=10)
    try:
        collector = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=40)
        await drain(rig)  # warm: exchanges declared, first events through
        diadoc.model.add_events(BOX, count=40)
        amqp_proxy.cut_after(3000)  # mid-page, mid-frame
        with pytest.raises(NotConfirmed):
            await drain(rig)
        await assert_cursor_behind_delivered(
            rig, diadoc, {m.message_id for m in await collector.settle(quiet=0.3)}
        )
        assert await rig.publisher.wait_connected(10)
        await drain(rig)
        messages = await collector.settle(quiet=0.3)
        assert {m.message_id for m in messages} == keys(diadoc)
    finally:
        await rig.close()


# -- a 401 between pages ----------------------------------------------------------------------


async def test_a_401_mid_feed_neither_loses_nor_skips_a_page(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig
) -> None:
    rig: Rig = await make_rig(page_limit=5)
    try:
        collector = await consume(amqp_ns)
        diadoc.model.add_events(BOX, count=23)
        # The first token works for two pages; the third page meets an expired token.
        diadoc.model.add_faults([FaultRule(expire_tokens=True, after=2)])
        await drain(rig)
        messages = await collector.settle(quiet=0.3)
        assert [m.message_id for m in messages] == [e.key for e in diadoc.model.events(BOX)]
        requests = diadoc.model.requests
        failed = next(i for i, r in enumerate(requests) if r["status"] == 401)
        assert requests[failed + 1]["after"] == requests[failed]["after"]  # the same page again
        assert requests[failed + 1]["status"] == 200
        assert rig.feed.client.auth.refreshes == 2
    finally:
        await rig.close()


# -- kills at random moments ------------------------------------------------------------------


async def test_every_event_survives_kills_at_random_moments(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, make_rig: MakeRig, rng: random.Random
) -> None:
    collector = await consume(amqp_ns)
    diadoc.model.latency_ms = 2  # widen the windows a kill can land in
    kills = 0
    late: set[str | None] = set()  # filed behind the cursor on purpose: the re-scan's business
    for _ in range(15):
        rig: Rig = await make_rig(page_limit=7, rescan_interval=0.05)
        drainer = PolledDrainer(
            rig.feed, metrics=Metrics(), interval=0.02, backoff_base=0.02, backoff_cap=0.1
        )
        diadoc.model.add_events(BOX, count=rng.randrange(0, 25), documents=rng.choice((1, 1, 2)))
        if rng.random() < 0.4:  # a tie, up to one more than a page holds
            diadoc.model.add_events(BOX, count=rng.randrange(2, 9), tied=True)
        if rng.random() < 0.15:
            diadoc.model.add_events(BOX, defect=rng.choice(DEFECTS))
        if rng.random() < 0.3:
            late.update(e.key for e in diadoc.model.add_events(BOX, age_s=rng.uniform(1, 1800)))
        if rng.random() < 0.2:
            diadoc.model.add_faults([FaultRule(expire_tokens=True, after=rng.randrange(3))])
        if rng.random() < 0.2:
            diadoc.model.add_faults([FaultRule(status=503, after=rng.randrange(3))])
        drainer.start()
        await asyncio.sleep(rng.uniform(0, 0.25))  # the random moment of the kill: the subject
        kills += drainer.in_pass
        await drainer.stop(0)  # cancels wherever the pass is
        assert drainer.stopped is None, drainer.stopped
        stored = await rig.state.cursor(SOURCE, BOX)  # None: killed before the first read
        await rig.close()
        # Confirmed means stored in the queue; wait until it reached the consumer too.
        delivered = {m.message_id for m in await collector.settle(quiet=0.15)}
        if stored is not None:
            await assert_cursor_behind_delivered(Cursor.loads(stored), diadoc, delivered | late)
    rig = await make_rig(page_limit=7, rescan_interval=0.0)
    try:
        await drain(rig)
        messages = await collector.settle(quiet=0.3)
        delivered = {m.message_id for m in messages}
        missing = keys(diadoc) - delivered
        assert not missing, f"{len(missing)} events never published"
        assert kills > 0, "no kill landed inside a pass"
        # The documented bound: a kill between a confirm and the seen-set's write publishes
        # that batch again: a page of the feed (7), a tie that did not fit one (up to 8), or
        # the late events of a re-scan page.
        copies = Counter(m.message_id for m in messages)
        extra = sum(n - 1 for n in copies.values())
        assert extra <= kills * 8 + len(late), f"{extra} duplicates, {kills} kills"
    finally:
        await rig.close()


# -- wiring and status ------------------------------------------------------------------------


async def test_wiring_builds_one_drainer_per_box_and_reports_status(
    diadoc: DiadocEmulatorServer, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    env = {
        **diadoc.env((BOX, "box-b")),
        "BRIDGE_DIADOC_EXCHANGE": exchange(amqp_ns),
        "BRIDGE_DIADOC_POLL_INTERVAL": "0.05",
    }
    settings = load_diadoc_settings(env)
    state = await State.open(str(tmp_path / "wired.sqlite3"))
    publisher = AmqpPublisher(amqp_ns.url, unrouted_exchange=amqp_ns.unrouted_exchange)
    await publisher.start()
    metrics = Metrics()
    collector = await consume(amqp_ns)
    diadoc.model.add_events(BOX, count=3)
    try:
        async with httpx.AsyncClient() as http:
            drainers = diadoc_drainers(
                settings, state=state, publisher=publisher, metrics=metrics, http=http
            )
            assert [d.source.name for d in drainers] == ["diadoc:box-a", "diadoc:box-b"]
            for drainer in drainers:
                drainer.start()
            await collector.wait_for(3)
            diadoc.model.add_events("box-b", defect="bad_timestamp")
            diadoc.model.add_events("box-b", count=2)  # found by the next poll tick
            await collector.wait_for(5)
            for drainer in drainers:
                await drainer.stop(5)
        status = await diadoc_status(settings, state)
        assert [s["box_id"] for s in status] == [BOX, "box-b"]
        assert status[0]["cursor"] == diadoc.model.events(BOX)[-1].index_key
        assert status[1]["lag_s"] is not None
        assert status[1]["lag_s"] < 5
        assert [s["api_version"] for s in status] == ["V5", "V5"]
        assert [s["malformed"] for s in status] == [0, 1]
        exposition = metrics.registry.get_sample_value(
            "bitrix24_bridge_diadoc_events_published_total", {"box": "box-b"}
        )
        assert exposition == 2
        assert (
            diadoc_drainers(
                load_diadoc_settings({}),
                state=state,
                publisher=publisher,
                metrics=metrics,
                http=http,
            )
            == []
        )
    finally:
        await publisher.close()
        await state.close()
