"""Which shard a portal belongs to, and how many shards a replica should hold.

A portal's shard is ``zlib.crc32(member_id as UTF-8) mod BRIDGE_SHARDS``: CRC-32 is the same in
every process and release (Python's ``hash()`` is salted per process), and spreads Bitrix24's
32-hex-digit member ids evenly enough for a few hundred shards.

Fair share over ``R`` live replicas: at most ``ceil(N/R)`` shards each. A cap alone can leave
64 shards as 22/22/20, so a replica that sees another below ``floor(N/R)`` with too few free
shards to make up the gap holds only ``floor(N/R)`` and hands the rest over; free shards beyond
the others' gap may be taken up to the cap. Counts end within ±1 of each other, and a replica
back from a partition does not take shards from one that holds a fair share.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping


def shard_of(member_id: str, shards: int) -> int:
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return zlib.crc32(member_id.encode()) % shards


def fair_target(shards: int, others: Mapping[str, int], mine: int, free: int) -> int:
    """How many shards to hold, given the live leases ``others`` hold (live replicas with none
    count with 0), the ``mine`` this replica holds, and the ``free`` (unheld or expired) ones."""
    replicas = len(others) + 1
    floor, extra = divmod(shards, replicas)
    ceil = floor + (1 if extra else 0)
    if mine < floor:
        return floor
    gap = sum(floor - count for count in others.values() if count < floor)
    if gap > free:
        return floor
    return min(ceil, mine + free - gap)
