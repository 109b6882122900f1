"""Diadoc's ``Timestamp``: .NET ticks (100 ns since 0001-01-01 UTC) ⇄ Unix seconds."""

from __future__ import annotations

from datetime import UTC, datetime

TICKS_PER_SECOND = 10_000_000
UNIX_EPOCH_TICKS = 621_355_968_000_000_000


def to_ticks(unix_seconds: float) -> int:
    return UNIX_EPOCH_TICKS + round(unix_seconds * TICKS_PER_SECOND)


def to_unix(ticks: int) -> float:
    return (ticks - UNIX_EPOCH_TICKS) / TICKS_PER_SECOND


def to_datetime(ticks: int) -> datetime:
    return datetime.fromtimestamp(to_unix(ticks), UTC)


def timestamp(unix_seconds: float) -> dict[str, int]:
    """The JSON form Diadoc expects: ``{"Ticks": n}``."""
    return {"Ticks": to_ticks(unix_seconds)}
