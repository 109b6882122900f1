"""An in-memory publisher for unit tests: the same protocol, no broker.

It keeps what it "stored" per exchange, in order, and refuses what it is told to refuse: by
message (a rule on the message, with a reason and how many times) or everything (``down``, as a
lost connection). Its confirmations are real :class:`~bridge.amqp.protocol.Confirmed` proofs,
so a source under test clears exactly what this publisher confirmed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.amqp.protocol import FailureReason, OutgoingMessage, PublishResult, _confirm

Rule = Callable[[OutgoingMessage], bool]


@dataclass
class _Refusal:
    rule: Rule
    reason: FailureReason
    times: int | None  # None: for ever


@dataclass
class MemoryPublisher:
    stored: list[OutgoingMessage] = field(default_factory=list)
    down: bool = False
    calls: int = 0
    _refusals: list[_Refusal] = field(default_factory=list)

    def refuse(self, rule: Rule, reason: FailureReason = "nack", times: int | None = None) -> None:
        """Refuse the messages ``rule`` picks, ``times`` times in all (None: always)."""
        self._refusals.append(_Refusal(rule, reason, times))

    def heal(self) -> None:
        self._refusals.clear()
        self.down = False

    def by_exchange(self, exchange: str) -> list[OutgoingMessage]:
        return [m for m in self.stored if m.exchange == exchange]

    @property
    def connected(self) -> bool:
        return not self.down

    @property
    def problem(self) -> str | None:
        return "broker connection closed" if self.down else None

    async def publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        (result,) = await self.publish_pages([messages])
        return result

    async def publish_pages(
        self, pages: Sequence[Sequence[OutgoingMessage]]
    ) -> list[PublishResult]:
        self.calls += 1
        results = []
        for page in pages:
            ok: list[OutgoingMessage] = []
            failed: list[tuple[OutgoingMessage, FailureReason]] = []
            for message in page:
                reason = self._refusal(message)
                if reason is None:
                    self.stored.append(message)
                    ok.append(message)
                else:
                    failed.append((message, reason))
            results.append(PublishResult(tuple(ok), tuple(failed), _confirm(ok)))
        return results

    def _refusal(self, message: OutgoingMessage) -> FailureReason | None:
        if self.down:
            return "connection"
        for refusal in self._refusals:
            if refusal.times == 0 or not refusal.rule(message):
                continue
            if refusal.times is not None:
                refusal.times -= 1
            return refusal.reason
        return None
