"""Waiting on a condition, never on the clock alone.

One polling loop serves every test: :func:`tests.harness.until`, which awaits its predicate.
:func:`holds` adapts a plain check (an attribute, a counter) to it, so a test never needs a
loop or a fixed sleep of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


def holds(check: Callable[[], object]) -> Callable[[], Awaitable[bool]]:
    """``check`` as a predicate for ``until``: ``await until(holds(lambda: x == 1), "x is 1")``."""

    async def predicate() -> bool:
        return bool(check())

    return predicate
