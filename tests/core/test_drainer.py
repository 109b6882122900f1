"""The drain loop's scheduling, with a small fake source (the real one: the Bitrix24 offline
queue, in ``tests/bitrix24/``)."""

import asyncio

from bridge.core.drainer import Drainer
from bridge.core.errors import PortalStopped, TransientError
from bridge.core.source import PassReport
from bridge.metrics import Metrics
from tests.harness import until
from tests.waiting import holds


class FakeSource:
    def __init__(self) -> None:
        self.passes = 0
        self.running = 0
        self.max_running = 0
        self.gate: asyncio.Event | None = None
        self.fail_next: list[Exception] = []
        self.covered_until = 1000.0
        self.full_checks: list[bool] = []
        self.stop_requested = False

    @property
    def name(self) -> str:
        return "fake.example"

    def request_stop(self) -> None:
        self.stop_requested = True

    async def run_pass(self, *, full_check: bool) -> PassReport:
        self.passes += 1
        self.full_checks.append(full_check)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_next:
                raise self.fail_next.pop(0)
            return PassReport(covered_until=self.covered_until)
        finally:
            self.running -= 1


async def _settle(drainer: Drainer) -> None:
    await asyncio.sleep(0)
    await asyncio.wait_for(drainer.idle.wait(), 5)


async def test_first_pass_runs_at_start_with_a_full_check() -> None:
    source = FakeSource()
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await _settle(drainer)
    assert source.passes == 1
    assert source.full_checks == [True]
    await drainer.stop(1)


async def test_notifications_during_a_pass_coalesce_into_one_more() -> None:
    source = FakeSource()
    source.gate = asyncio.Event()
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await until(holds(lambda: source.running == 1), "the first pass")
    assert source.passes == 1
    for ts in range(2000, 2100):
        drainer.notify(float(ts))
    source.covered_until = 1500.0  # this pass started before the notifications were sent
    source.gate.set()
    await _settle(drainer)
    assert source.passes == 2
    assert source.max_running == 1
    await drainer.stop(1)


async def test_notification_already_covered_costs_nothing() -> None:
    source = FakeSource()
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await _settle(drainer)
    assert source.passes == 1
    # A replayed notification from before the empty answer: covered, so nothing wakes the loop.
    assert drainer.notify(999.0) is False
    assert not drainer._wake.is_set()
    assert drainer.idle.is_set()
    assert source.passes == 1
    # One sent in the same second as the empty answer is not provably covered: drain.
    assert drainer.notify(1000.0) is True
    await _settle(drainer)
    assert source.passes == 2
    await drainer.stop(1)


async def test_covered_check_also_applies_to_notifications_queued_during_a_pass() -> None:
    source = FakeSource()
    source.gate = asyncio.Event()
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await until(holds(lambda: source.running == 1), "the first pass")
    drainer.notify(1200.0)
    source.covered_until = 1300.0  # the pass's empty answer came after the notification
    source.gate.set()
    await _settle(drainer)
    assert source.passes == 1
    await drainer.stop(1)


async def test_failed_pass_is_retried_after_backoff_with_full_check() -> None:
    source = FakeSource()
    source.fail_next = [TransientError("QUERY_LIMIT_EXCEEDED")]
    drainer = Drainer(source, metrics=Metrics(), backoff_base=0.05, backoff_cap=0.05)
    drainer.start()
    await until(holds(lambda: source.passes >= 2), "the retry after the back-off")
    await _settle(drainer)
    assert source.passes == 2
    assert source.full_checks == [True, True]
    assert drainer.failures == 0
    await drainer.stop(1)


async def test_configuration_error_stops_the_portal() -> None:
    source = FakeSource()
    source.fail_next = [PortalStopped("WRONG_LICENSE", "no rest_offline_extended")]
    metrics = Metrics()
    drainer = Drainer(source, metrics=metrics, backoff_base=0.01)
    drainer.start()
    await _settle(drainer)
    assert drainer.stopped is not None
    assert "WRONG_LICENSE" in drainer.stopped
    drainer.notify(5000.0)
    # A stopped portal sits out notifications: the loop waits for a resume, not for them.
    await asyncio.sleep(0.05)  # a window in which no pass may start: the subject
    assert source.passes == 1
    value = metrics.registry.get_sample_value(
        "bitrix24_bridge_portal_stopped", {"portal": "fake.example"}
    )
    assert value == 1
    await drainer.stop(1)


async def test_stop_waits_for_the_pass_then_cancels_after_grace() -> None:
    source = FakeSource()
    source.gate = asyncio.Event()
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await until(holds(lambda: source.running == 1), "the pass to start")
    await drainer.stop(0.05)
    assert source.stop_requested
    assert not drainer.alive


async def test_same_second_notifications_are_paced_by_the_request_rate() -> None:
    source = FakeSource()
    drainer = Drainer(source, metrics=Metrics(), min_gap=0.3)
    drainer.start()
    await _settle(drainer)
    assert source.passes == 1
    # covered_until=1000.0: ts 1000 may be newer than the empty answer, so it runs, but not
    # more often than min_gap however many arrive.
    started = asyncio.get_running_loop().time()
    for _ in range(50):
        drainer.notify(1000.0)
        await asyncio.sleep(0.01)  # notifications spread over half a second: the subject
    await _settle(drainer)
    elapsed = asyncio.get_running_loop().time() - started
    assert 2 <= source.passes <= 1 + int(elapsed / 0.3) + 1
    # A notification from a later second is not paced.
    before = source.passes
    drainer.notify(1001.0)
    await until(holds(lambda: source.passes == before + 1), "the unpaced pass")
    await drainer.stop(1)


async def test_a_replayed_notification_does_not_wake_the_loop_again() -> None:
    source = FakeSource()
    drainer = Drainer(source, metrics=Metrics(), min_gap=30)
    drainer.start()
    try:
        await _settle(drainer)
        drainer.notify(1000.5)  # the same second as the empty answer: due, but paced
        # The loop takes the wake-up and sits out min_gap.
        await until(holds(lambda: not drainer._wake.is_set()), "the loop to take the wake-up")
        for _ in range(100):
            assert drainer.notify(1000.5)
            assert drainer.notify(1000.0)
        assert not drainer._wake.is_set()  # nothing new: it sleeps on
        assert source.passes == 1
        drainer.notify(1001.0)  # a later second wakes it and runs at once
        await until(holds(lambda: source.passes == 2), "the pass of a later second", timeout=1)
    finally:
        await drainer.stop(1)


async def test_operating_time_limit_waits_for_the_reset() -> None:
    source = FakeSource()
    source.fail_next = [TransientError("OPERATION_TIME_LIMIT", retry_after=0.4)]
    drainer = Drainer(source, metrics=Metrics(), backoff_base=0.01, backoff_cap=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    drainer.start()
    await until(holds(lambda: source.passes >= 2), "the pass after the reset")
    assert source.passes == 2
    assert loop.time() - started >= 0.4  # not before the portal's reset: the subject
    await drainer.stop(1)


async def test_a_stopped_source_is_checked_again_after_its_recheck_time() -> None:
    source = FakeSource()
    source.fail_next = [PortalStopped("METHOD_CONFIRM_WAITING", recheck_after=0.3)]
    reasons: list[str | None] = []
    drainer = Drainer(source, metrics=Metrics())
    drainer.on_stop = reasons.append
    drainer.start()
    await until(holds(lambda: drainer.stopped is not None), "the stop")
    assert "METHOD_CONFIRM_WAITING" in (drainer.stopped or "")
    await until(holds(lambda: drainer.stopped is None and source.passes >= 2), "the re-check")
    assert drainer.stopped is None
    assert source.passes == 2
    assert reasons == ["METHOD_CONFIRM_WAITING", None]
    await drainer.stop(1)


async def test_a_stop_without_a_recheck_stays_until_resumed() -> None:
    source = FakeSource()
    source.fail_next = [PortalStopped("OVERLOAD_LIMIT", recheck_after=None)]
    drainer = Drainer(source, metrics=Metrics())
    drainer.start()
    await until(holds(lambda: drainer.stopped is not None), "the stop")
    drainer.notify(None)
    await asyncio.sleep(0.2)  # a window in which no pass may start: the subject
    assert source.passes == 1
    assert drainer.stopped is not None
    drainer.resume()
    await _settle(drainer)
    assert source.passes == 2
    assert drainer.stopped is None
    await drainer.stop(1)
