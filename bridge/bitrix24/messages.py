"""A Bitrix24 offline event as the AMQP message consumers receive."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.amqp.protocol import OutgoingMessage


class MalformedEvent(ValueError):
    """An event row the bridge cannot turn into a message; its page stays reserved."""


@dataclass(frozen=True, slots=True)
class Routing:
    """Where a portal's events go; built once per portal, used for every event."""

    exchange_template: str
    routing_key_template: str
    member_id: str
    domain: str
    connector: str

    # Rendered once per event name, not once per message.
    @functools.lru_cache(maxsize=512)  # noqa: B019 - a handful of long-lived Routing objects
    def exchange(self, event: str) -> str:
        return self.exchange_template.format(
            event=event, domain=self.domain, member_id=self.member_id
        )

    @functools.lru_cache(maxsize=512)  # noqa: B019
    def routing_key(self, event: str) -> str:
        return self.routing_key_template.format(
            event=event, domain=self.domain, member_id=self.member_id
        )


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_message(row: Mapping[str, Any], routing: Routing) -> OutgoingMessage:
    try:
        event_id = row["ID"]
        stamp = row["TIMESTAMP_X"]
        name = row["EVENT_NAME"]
        message_key = row["MESSAGE_ID"]
    except (KeyError, TypeError) as exc:
        raise MalformedEvent(f"event lacks {exc}") from None
    if not isinstance(event_id, str | int) or isinstance(event_id, bool):
        raise MalformedEvent("event ID is not a string or integer")
    if not isinstance(name, str) or not name or not isinstance(stamp, str):
        raise MalformedEvent("event has no EVENT_NAME or TIMESTAMP_X")
    if not isinstance(message_key, str) or len(message_key) != 32:
        raise MalformedEvent("event has no 32-character MESSAGE_ID")
    lowered = name.lower()
    headers = {
        "x-bitrix24-domain": routing.domain,
        "x-bitrix24-member-id": routing.member_id,
        "x-bitrix24-event": name,
        "x-bitrix24-event-id": str(event_id),
        "x-bitrix24-message-id": message_key,
    }
    if routing.connector:
        headers["x-bitrix24-connector"] = routing.connector
    return OutgoingMessage(
        exchange=routing.exchange(lowered),
        routing_key=routing.routing_key(lowered),
        body=_dumps(row).encode(),
        message_id=f"{routing.member_id}:{event_id}:{stamp}",
        type=name,
        timestamp=_timestamp(stamp),
        headers=headers,
        key=message_key,
    )


def _timestamp(stamp: str) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None
