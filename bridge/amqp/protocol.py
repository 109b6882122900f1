"""What a source hands to the broker and what it gets back.

A :class:`Confirmed` is the proof that the broker acknowledged a page's messages. Only a
publisher of this package makes one (its constructor refuses any other caller), and everything
that removes events upstream (``event.offline.clear``, the journal's record of a confirmation,
moving a cursor) takes one: "clear before confirm" does not type-check, and cannot be forged at
run time either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

FailureReason = Literal["nack", "returned", "timeout", "connection", "missing_exchange"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: datetime | None
    headers: Mapping[str, str]
    key: str  # the source's identity of the message, handed back untouched


class _Seal:
    """Held only by this package's publishers."""


_SEAL = _Seal()


class Confirmed:
    """The messages of one page the broker acknowledged (``basic.ack``), in publish order."""

    __slots__ = ("messages",)

    def __init__(self, messages: Sequence[OutgoingMessage], *, seal: object = None) -> None:
        if seal is not _SEAL:
            raise TypeError("only a publisher confirms messages")
        if not messages:
            raise ValueError("a confirmation names at least one message")
        self.messages: tuple[OutgoingMessage, ...] = tuple(messages)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(m.key for m in self.messages)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(m.type for m in self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def __repr__(self) -> str:
        return f"Confirmed({len(self.messages)} messages)"


def _confirm(messages: Sequence[OutgoingMessage]) -> Confirmed | None:
    """For this package's publishers only: the proof for ``messages`` (None when none)."""
    return Confirmed(messages, seal=_SEAL) if messages else None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """One page's outcome: what the broker stored (with its proof) and what it did not, why."""

    confirmed: tuple[OutgoingMessage, ...]
    failed: tuple[tuple[OutgoingMessage, FailureReason], ...]
    proof: Confirmed | None = None

    @property
    def complete(self) -> bool:
        return not self.failed


class Publisher(Protocol):
    """What a source needs of the broker side."""

    async def publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        """One page, in order, with confirms; never raises for a refused message."""
        ...

    async def publish_pages(
        self, pages: Sequence[Sequence[OutgoingMessage]]
    ) -> list[PublishResult]:
        """Several pages in one pipelined run, in order; one result per page."""
        ...

    @property
    def connected(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...
