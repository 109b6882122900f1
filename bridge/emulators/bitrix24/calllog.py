"""Every REST and OAuth request the emulator answered, with who sent it.

Entries are in the order answers went out; each has the time its request arrived, and a
sequence number, so a reader pages through the log with ``since``; memory is a
ring of the newest ``capacity`` entries, and ``path`` (optional) keeps all of them as JSON lines.
A client names itself with two request headers: ``X-Bridge-Replica`` (which process) and
``X-Bridge-Epoch`` (the shard epoch it held when it called).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Sequence
from typing import IO, Any

REPLICA_HEADER = "x-bridge-replica"
EPOCH_HEADER = "x-bridge-epoch"
DEFAULT_CAPACITY = 100_000
MAX_PAGE = 10_000


def now() -> tuple[float, float]:
    """The wall clock and the monotonic clock, read together."""
    return time.time(), time.monotonic()


class CallLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, path: str | None = None) -> None:
        if capacity < 0:
            raise ValueError("the call log's capacity must be 0 or more")
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._next = 0
        self._file: IO[str] | None = None
        if path:
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def record(
        self,
        *,
        kind: str,
        member_id: str | None,
        method: str,
        headers: Any,
        outcome: str,
        status: int,
        arrived: tuple[float, float] | None = None,
        commands: Sequence[str] | None = None,
    ) -> None:
        """``headers``: the request's (a mapping with ``get``, case-insensitive keys);
        ``arrived``: when the request came, as :func:`now` tells it (default: now);
        ``commands``: for a ``batch``, the methods of its commands in order."""
        wall, monotonic = arrived if arrived is not None else now()
        entry = {
            "seq": self._next,
            "time": wall,
            "monotonic": monotonic,
            "kind": kind,  # "rest" or "oauth"
            "member_id": member_id,
            "method": method,
            "replica": headers.get(REPLICA_HEADER),
            "epoch": headers.get(EPOCH_HEADER),
            "outcome": outcome,
            "status": status,
            "commands": None if commands is None else list(commands),
        }
        self._next += 1
        self._ring.append(entry)
        if self._file is not None:
            self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")

    @property
    def first(self) -> int:
        """The oldest sequence number still in memory."""
        return self._next - len(self._ring)

    def page(self, since: int, limit: int = 1000) -> dict[str, Any]:
        """Entries from ``since`` on; ``next`` is where the following page starts, ``lost`` how
        many entries between ``since`` and the oldest kept one the ring has let go."""
        since, limit = max(0, since), max(0, min(limit, MAX_PAGE))
        start = max(since, self.first)
        offset = start - self.first
        calls = list(itertools.islice(self._ring, offset, offset + limit))
        following = start + len(calls)
        return {
            "calls": calls,
            "next": max(following, since),
            "lost": max(0, self.first - since),
            "total": self._next,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
