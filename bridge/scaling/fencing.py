"""The proof a replica shows before it acts or writes for a shard.

A :class:`Fence` is a replica's claim on one shard at one epoch. It is valid while the lease
manager still holds that shard at that epoch and its local deadline (last successful renewal +
TTL, on the monotonic clock) has not passed, whether or not the database answers.
:func:`check_lease` repeats the check in the database, inside the caller's transaction, so a
journal or cursor write made by a replica that was taken over is refused, not applied.
:class:`FencedPublisher` makes the same check before every publish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.amqp.protocol import OutgoingMessage, Publisher, PublishResult
from bridge.core.errors import LeaseLost


@dataclass(frozen=True, slots=True)
class Fence:
    holder: str
    shard: int
    epoch: int
    # The lease manager's answer to "do I still hold this shard at this epoch right now?"
    held: Callable[[int, int], bool]

    @property
    def valid(self) -> bool:
        return self.held(self.shard, self.epoch)

    def check(self) -> None:
        if not self.valid:
            raise LeaseLost(f"shard {self.shard} epoch {self.epoch} is no longer held")


async def check_lease(conn: psycopg.AsyncConnection[Any], fence: Fence) -> None:
    """Inside an open transaction: raise LeaseLost unless the lease is still ours.

    ``FOR KEY SHARE`` keeps a takeover (``FOR UPDATE SKIP LOCKED``) off the row until the
    caller's transaction ends, while renewals (a non-key update) go on unhindered.
    """
    fence.check()
    cur = await conn.execute(
        "SELECT 1 FROM leases WHERE shard = %s AND holder = %s AND epoch = %s "
        "AND expires_at > now() FOR KEY SHARE",
        (fence.shard, fence.holder, fence.epoch),
    )
    if await cur.fetchone() is None:
        raise LeaseLost(f"shard {fence.shard} was taken over after epoch {fence.epoch}")


class FencedPublisher:
    """A publisher that publishes nothing for a shard this replica no longer holds."""

    def __init__(self, publisher: Publisher, fence: Fence) -> None:
        self._publisher = publisher
        self._fence = fence

    async def publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        self._fence.check()
        return await self._publisher.publish(messages)

    async def publish_pages(
        self, pages: Sequence[Sequence[OutgoingMessage]]
    ) -> list[PublishResult]:
        self._fence.check()
        return await self._publisher.publish_pages(pages)

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    @property
    def problem(self) -> str | None:
        return self._publisher.problem
