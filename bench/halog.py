"""What the emulator's call log tells about ownership: takeovers, epochs, a fenced replica.

Entries are the farm's call log (one JSON object a line): ``time`` (wall clock) and
``monotonic`` of arrival, ``member_id``, ``method``, ``commands`` (a batch's methods),
``replica`` and ``epoch`` (the request's ``X-Bridge-Replica`` and ``X-Bridge-Epoch``).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESERVE = "event.offline.get"

Call = dict[str, Any]


def load(path: Path) -> list[Call]:
    """Every entry, in the order requests arrived."""
    calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    calls.sort(key=lambda c: (c["monotonic"], c["seq"]))
    return calls


def reserves(call: Call) -> bool:
    """A reservation, sent alone or inside a batch, that the portal answered."""
    return call.get("status") == 200 and (
        call["method"] == RESERVE or RESERVE in (call.get("commands") or ())
    )


def first_reservations(
    calls: Sequence[Call], *, after: float, portals: Iterable[str], not_by: str
) -> dict[str, float | None]:
    """Per portal: seconds from ``after`` (wall clock) to its first reservation by a replica
    other than ``not_by``; None if there was none."""
    start = bisect.bisect_left([c["time"] for c in calls], after)
    waiting = set(portals)
    found: dict[str, float | None] = dict.fromkeys(waiting)
    for call in calls[start:]:
        if not waiting:
            break
        member = call.get("member_id")
        if member in waiting and call.get("replica") not in (None, not_by) and reserves(call):
            found[member] = call["time"] - after
            waiting.discard(member)
    return found


@dataclass(frozen=True)
class Epochs:
    interleaved: int  # calls with a lower epoch than one already seen for their portal
    unlabelled: int  # calls for a portal without a replica or epoch header
    portals: int
    epochs_seen: int  # distinct (portal, epoch) pairs
    examples: list[str]


def epochs(calls: Sequence[Call]) -> Epochs:
    """Once a higher epoch called for a portal, does a call with a lower epoch follow?"""
    highest: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    interleaved = unlabelled = 0
    examples: list[str] = []
    for call in calls:
        member = call.get("member_id")
        if member is None:
            continue
        if call.get("epoch") is None or call.get("replica") is None:
            unlabelled += 1
            continue
        epoch = int(call["epoch"])
        seen.add((member, epoch))
        top = highest.get(member, epoch)
        if epoch < top:
            interleaved += 1
            if len(examples) < 5:
                examples.append(
                    f"{member[:8]}: epoch {epoch} by {call['replica']} ({call['method']}) "
                    f"after epoch {top}"
                )
        highest[member] = max(top, epoch)
    return Epochs(interleaved, unlabelled, len(highest), len(seen), examples)


def last_call(calls: Sequence[Call], replica: str, before: float = math.inf) -> float | None:
    """The wall-clock arrival of ``replica``'s last call (REST or OAuth) before ``before``;
    None if none."""
    times = [c["time"] for c in calls if c.get("replica") == replica and c["time"] < before]
    return max(times) if times else None


def calls_between(calls: Sequence[Call], replica: str, start: float, end: float) -> int:
    return sum(1 for c in calls if c.get("replica") == replica and start <= c["time"] < end)


class Tail:
    """The call log file as the emulator writes it: each :meth:`read` adds the new entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[Call] = []
        self._offset = 0

    def read(self) -> list[Call]:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return self.calls
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for next time
        self._offset += len(complete)
        self.calls.extend(json.loads(line) for line in complete.splitlines() if line.strip())
        return self.calls

    def taken_over(self, *, after: float, portals: Iterable[str], not_by: str) -> bool:
        """Has every one of ``portals`` had a reservation by another replica since ``after``?"""
        calls = sorted(self.read()[-20_000:], key=lambda c: (c["monotonic"], c["seq"]))
        found = first_reservations(calls, after=after, portals=portals, not_by=not_by)
        return all(t is not None for t in found.values())
