"""The operating-time pacer (LoadLimiter v2: 420 s per sliding 10 minutes, 300 s bans)."""

from __future__ import annotations

from collections import deque

from bridge.bitrix24.pacing import BAN_PROBE_INTERVAL, MAX_COMMANDS, Pacer

GET = "event.offline.get"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pacer(clock: Clock, **kw: float) -> Pacer:
    return Pacer(clock=clock, **kw)


def test_until_the_portal_tells_its_total_one_call_at_a_time() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    assert pacer.plan(GET, 0, 25) == 1
    pacer.budget(GET).spend(1)
    pacer.budget(GET).report([0.025], 1)
    assert pacer.plan(GET, 0, 25) > 1


def test_a_total_spent_by_a_predecessor_is_respected() -> None:
    # A bridge restarted mid-backlog: the portal says 395 of 420 s are spent already.
    clock = Clock()
    pacer = _pacer(clock, limit=420)
    budget = pacer.budget(GET)
    budget.spend(1)
    budget.report([395.0], 1)
    budget.cost = 0.025
    spent = 395.0
    calls = 0
    # Over ten simulated minutes in which the portal's total never shrinks, the bridge spends
    # at most up to the ceiling (and its probes), never beyond the limit.
    for step in range(6000):
        clock.now += 0.1
        room = pacer.plan(GET, 0, 25)
        if room:
            budget.spend(room)
            calls += room
            spent += room * 0.025
            budget.report([spent], room)
        assert spent <= 420.0
        if step == 600:
            first_minute = calls
    # It still moves: at least half of what the 25 s left allow, within the first minute.
    assert first_minute * 0.025 >= 0.5 * (420 - 395)


def test_the_sustainable_rate_holds_over_a_long_run() -> None:
    clock = Clock()
    pacer = _pacer(clock, limit=420, safety=0.95)
    budget = pacer.budget(GET)
    budget.spend(1)
    budget.report([0.0], 1)
    budget.cost = 0.025
    window: deque[tuple[float, float]] = deque()
    total = 0.0
    for _ in range(36_000):  # one hour in steps of 0.1 s
        clock.now += 0.1
        room = pacer.plan(GET, 0, 25)
        if room:
            budget.spend(room)
            window.append((clock.now, room * 0.025))
            total += room * 0.025
        while window and window[0][0] <= clock.now - 600:
            total -= window.popleft()[1]
        budget.report([total], room)
        assert total <= 420.0 + 1e-9
    # ...and uses most of it: the throughput ceiling is the budget, not the pacer.
    assert total > 0.85 * 420


def test_a_ban_is_waited_out_with_one_probe_a_minute() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    budget = pacer.budget(GET)
    budget.spend(1)
    budget.report([1.0], 1)
    wait = pacer.banned(GET)
    assert wait == BAN_PROBE_INTERVAL
    probes = 0
    for _ in range(3000):  # five minutes in steps of 0.1 s
        clock.now += 0.1
        room = pacer.plan(GET, 0, 25)
        assert room <= 1
        if room:
            probes += 1
            budget.spend(1)
            pacer.banned(GET)  # still banned
    assert 4 <= probes <= 5
    clock.now += BAN_PROBE_INTERVAL
    assert pacer.plan(GET, 0, 25) == 1
    budget.spend(1)
    budget.report([1.0], 1)  # served again: the ban is lifted
    assert pacer.plan(GET, 0, 25) > 1


def test_a_banned_batch_stops_every_batched_call() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    pacer.budget(GET).report([0.0], 1)
    pacer.budget("batch").report([0.0], 1)
    assert pacer.plan(GET, 0, 25) > 0
    pacer.banned("batch")
    assert pacer.plan(GET, 0, 25) == 0
    assert pacer.wait_time(GET) >= BAN_PROBE_INTERVAL - 1


def test_costs_are_learned_from_the_portal_totals() -> None:
    # Requests of alternating size, 25 ms a call; the portal adds a request's time when it
    # ends (LoadLimiter v2), so each answer's total lags one request behind.
    clock = Clock()
    pacer = _pacer(clock)
    budget = pacer.budget(GET)
    total, previous = 10.0, 0
    for calls in [25, 10] * 10:
        clock.now += 0.5
        total += previous * 0.025
        budget.report([total], calls)
        previous = calls
    assert abs(budget.cost - 0.025) < 0.003
    assert pacer.plan(GET, 0, 100) <= MAX_COMMANDS


def test_operating_reset_at_of_the_last_success_brings_the_probe_forward() -> None:
    clock = Clock()
    pacer = _pacer(clock, probe_interval=60)
    pacer.observe_call(GET, {"operating": 415.0, "finish": 5000.0, "operating_reset_at": 5003})
    budget = pacer.budget(GET)
    budget.cost = 0.025
    assert pacer.plan(GET, 0, 25) == 0  # 415 s spent: above the ceiling
    clock.now += 2.0
    assert pacer.plan(GET, 0, 25) == 0
    clock.now += 1.5  # past operating_reset_at: one call to read the new total
    assert pacer.plan(GET, 0, 25) == 1
