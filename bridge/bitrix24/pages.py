"""Reserved pages and the part of them that may be cleared.

A :class:`ConfirmedPage` names, one by one, the events of a reservation that RabbitMQ confirmed
(or that a journal written after such a confirmation says were); it is the only thing
``event.offline.clear`` is ever called with. It never clears a whole process: a portal that
stamped rows it did not return would otherwise lose rows nobody read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.amqp.publisher import OutgoingMessage, PublishResult


@dataclass(frozen=True, slots=True)
class Reservation:
    process_id: str
    rows: tuple[Mapping[str, Any], ...]
    replay: bool = False  # parked rows reserved again (read with error=1)


@dataclass(frozen=True, slots=True)
class ConfirmedPage:
    """Events of one reservation that may be cleared; ``done``: nothing else is left under it."""

    process_id: str
    message_ids: tuple[str, ...]
    event_names: tuple[str, ...]
    done: bool

    def __post_init__(self) -> None:
        # An empty process_id selects every unreserved row (free and parked) of the queue.
        if not self.process_id:
            raise ValueError("a confirmed page belongs to a reservation")
        # Bitrix24 reads an empty list as "the whole process": never send one.
        if not self.message_ids:
            raise ValueError("a confirmed page names at least one event")
        if len(self.message_ids) != len(self.event_names):
            raise ValueError("one event name per message id")

    def clear_params(self) -> dict[str, Any]:
        return {"process_id": self.process_id, "message_id": list(self.message_ids)}


def confirmed_page(
    process_id: str, confirmed: Sequence[OutgoingMessage], *, done: bool
) -> ConfirmedPage | None:
    """The clearable part of a page from what the broker confirmed (None when nothing was)."""
    if not confirmed:
        return None
    return ConfirmedPage(
        process_id=process_id,
        message_ids=tuple(m.key for m in confirmed),
        event_names=tuple(m.type for m in confirmed),
        done=done,
    )


def split(result: PublishResult, owners: Mapping[int, int], pages: int) -> list[PublishResult]:
    """One publisher result per page; ``owners`` maps ``id(message)`` to its page's index."""
    confirmed: list[list[OutgoingMessage]] = [[] for _ in range(pages)]
    failed: list[list[tuple[OutgoingMessage, str]]] = [[] for _ in range(pages)]
    for message in result.confirmed:
        confirmed[owners[id(message)]].append(message)
    for message, reason in result.failed:
        failed[owners[id(message)]].append((message, reason))
    return [
        PublishResult(confirmed=tuple(c), failed=tuple(f))
        for c, f in zip(confirmed, failed, strict=True)
    ]
