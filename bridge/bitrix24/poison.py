"""No single event stops a portal: events the broker keeps refusing are parked.

An event that fails ``BRIDGE_POISON_ATTEMPTS`` times in a row (nacked, returned although the
unrouted path was declared again, or malformed) is moved out of the way with
``event.offline.error``: it stays in the portal, readable with ``event.offline.get {error: 1}``
and ``bitrix24-bridge parked``, and ``parked --replay`` drains it again once the cause is fixed.
A malformed row is retried like the others: the answer may have been damaged on its way.
Timeouts and lost connections never count: they are the broker's trouble, not the event's.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.bitrix24.upstream import PortalClient
from bridge.metrics import Metrics
from bridge.state.open import StateStore

log = logging.getLogger(__name__)

ERROR = "event.offline.error"
# Refusals that follow the event, not the broker.
COUNTED = frozenset({"nack", "returned", "malformed"})


@dataclass(frozen=True, slots=True)
class Refused:
    row: Mapping[str, Any]
    reason: str  # nack, returned or malformed


class PoisonGuard:
    def __init__(
        self,
        client: PortalClient,
        *,
        state: StateStore,
        metrics: Metrics,
        connector: str,
        attempts: int,
    ) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics
        self._connector = connector
        self._limit = attempts
        self._failures: Counter[tuple[str, str]] = Counter()

    def count(self, process_id: str, refused: Sequence[Refused]) -> list[Refused]:
        """Record failed attempts; answers the events that must be parked now."""
        due: list[Refused] = []
        for item in refused:
            if item.reason not in COUNTED:
                continue
            key = (process_id, str(item.row.get("MESSAGE_ID")))
            self._failures[key] += 1
            if self._failures[key] >= self._limit:
                due.append(item)
        return due

    def forget(self, process_id: str) -> None:
        for key in [k for k in self._failures if k[0] == process_id]:
            del self._failures[key]

    async def park(self, process_id: str, items: Sequence[Refused]) -> list[str]:
        """Take ``items`` out of the way; answers the MESSAGE_IDs now free of the reservation."""
        if not process_id:
            raise ValueError("parking needs the reservation's process_id")
        by_message = [i for i in items if _message_id(i.row) is not None]
        local = [i for i in items if _message_id(i.row) is None]
        parked: list[str] = []
        if by_message:
            ids = [str(_message_id(i.row)) for i in by_message]
            params: dict[str, Any] = {"process_id": process_id, "message_id": ids}
            if self._connector:
                params["auth_connector"] = self._connector
            await self._client.call(ERROR, params, idempotent=True)
            parked.extend(ids)
        for item in local:
            # Without a MESSAGE_ID the portal cannot park it: keep it in the state file, where
            # `bitrix24-bridge parked` shows it. It stays reserved in the portal.
            await self._state.park(
                "bitrix24",
                self._client.portal.member_id,
                f"{process_id}:{item.row.get('ID')}",
                item.reason,
                json.dumps(item.row, ensure_ascii=False, default=str),
            )
        for item in items:
            name = str(item.row.get("EVENT_NAME") or "unknown")[:64]
            self._metrics.events_parked.labels(event=name, reason=item.reason).inc()
            self._failures.pop((process_id, str(item.row.get("MESSAGE_ID"))), None)
        log.error(
            "events parked: the broker keeps refusing them or they are malformed",
            extra={
                "portal": self._client.portal.domain,
                "process_id": process_id,
                "events": len(items),
                "reasons": sorted({i.reason for i in items}),
                "event_ids": [str(i.row.get("ID")) for i in items][:20],
            },
        )
        return parked


def _message_id(row: Mapping[str, Any]) -> str | None:
    value = row.get("MESSAGE_ID")
    return value if isinstance(value, str) and len(value) == 32 else None
