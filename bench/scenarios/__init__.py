"""The scenarios, in the order ``python -m bench`` runs them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.context import Context
from bench.report import Result
from bench.scenarios import burst, drain, e2e, ha, kills, memory, throttled


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Context, Result], Awaitable[None]]


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("drain", drain.TITLE, drain.run),
        Scenario("throttled", throttled.TITLE, throttled.run),
        Scenario("burst", burst.TITLE, burst.run),
        Scenario("e2e", e2e.TITLE, e2e.run),
        Scenario("memory", memory.TITLE, memory.run),
        Scenario("kills", kills.TITLE, kills.run),
        Scenario("ha", ha.TITLE, ha.run),
    )
}
