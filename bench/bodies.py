"""Messages exactly as the bridge must build them (SPEC §6), for the raw-publishing baseline.

Built from the contract, not imported from ``bridge.bitrix24.messages``: the baseline must not
change when the bridge does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

ZONE = timezone(timedelta(minutes=180))  # the emulator's default portal time zone
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_sorted = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Prepared:
    body: bytes
    message_id: str
    event: str
    timestamp: datetime
    headers: dict[str, str]


def event_row(index: int, event: str, stamp: int) -> dict[str, Any]:
    """An ``event.offline.get`` row as the emulator answers it for ``generate``."""
    data = {"FIELDS": {"ID": str(index)}}
    key = hashlib.md5((event + _sorted(data)).encode(), usedforsecurity=False).hexdigest()
    return {
        "ID": str(index),
        "TIMESTAMP_X": datetime.fromtimestamp(stamp, ZONE).isoformat(),
        "EVENT_NAME": event,
        "EVENT_DATA": data,
        "EVENT_ADDITIONAL": {"user_id": "1"},
        "MESSAGE_ID": key,
    }


def prepare(count: int, *, event: str, member_id: str, domain: str) -> list[Prepared]:
    stamp = int(datetime.now(UTC).timestamp())
    prepared = []
    for index in range(1, count + 1):
        row = event_row(index, event, stamp)
        prepared.append(
            Prepared(
                body=_dumps(row).encode(),
                message_id=f"{member_id}:{row['ID']}:{row['TIMESTAMP_X']}",
                event=event,
                timestamp=datetime.fromisoformat(row["TIMESTAMP_X"]),
                headers={
                    "x-bitrix24-domain": domain,
                    "x-bitrix24-member-id": member_id,
                    "x-bitrix24-event": event,
                    "x-bitrix24-event-id": row["ID"],
                    "x-bitrix24-message-id": row["MESSAGE_ID"],
                },
            )
        )
    return prepared
