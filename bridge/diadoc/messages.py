"""A Diadoc docflow event as the AMQP message consumers receive.

All boxes publish to one topic exchange (``BRIDGE_DIADOC_EXCHANGE``, default ``diadoc.events``)
with the routing key ``{box}.{document_type}``: a consumer binds ``<box>.#`` for one organisation,
``*.UniversalTransferDocument`` for one kind of document everywhere, or ``#`` for everything.
A new document type needs no new exchange, and events nobody bound yet land in the unrouted
exchange instead of being dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.amqp.protocol import OutgoingMessage
from bridge.diadoc.ticks import to_datetime

UNKNOWN_TYPE = "unknown"
MAX_REJECT_BODY = 65_536  # characters of a malformed event kept in the state file
_POPULATED = frozenset({"Document", "PreviousDocumentState"})

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class MalformedEvent(ValueError):
    """An event the bridge cannot publish: it is recorded as a :class:`Reject` and passed."""


@dataclass(frozen=True, slots=True)
class Reject:
    """A malformed event, as the state file keeps it for an operator to inspect."""

    reason: str
    index_key: str | None  # where it sits in the feed, if it says
    raw: object

    @property
    def body(self) -> str:
        text = json.dumps(self.raw, ensure_ascii=False, sort_keys=True, default=repr)
        return text[:MAX_REJECT_BODY]

    @property
    def fingerprint(self) -> str:
        """The same event read again is recorded once, with or without its document (the
        re-scan reads bare events)."""
        core = self.raw
        if isinstance(core, Mapping):
            core = {k: v for k, v in core.items() if k not in _POPULATED}
        text = json.dumps(core, ensure_ascii=False, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def ref(self) -> str:
        """How the state file names it: where it sits in the feed, and which event it is."""
        return f"{self.index_key or '-'}:{self.fingerprint}"

    @classmethod
    def of(cls, raw: object, exc: MalformedEvent) -> Reject:
        return cls(reason=str(exc), index_key=index_key_of(raw), raw=raw)


def index_key_of(raw: object) -> str | None:
    key = raw.get("IndexKey") if isinstance(raw, Mapping) else None
    return key if isinstance(key, str) and key else None


@dataclass(frozen=True, slots=True)
class DocflowEvent:
    event_id: str
    message_id: str
    entity_id: str
    index_key: str
    ticks: int
    document_type: str
    raw: Mapping[str, Any]

    @property
    def key(self) -> str:
        """The identity of one event.

        ``EventId`` alone is not enough: Diadoc gives every document touched by one change of a
        message the same ``EventId``, so the entity is part of the identity.
        """
        return f"{self.event_id}:{self.entity_id}" if self.entity_id else self.event_id


def parse_event(raw: object) -> DocflowEvent:
    if not isinstance(raw, Mapping):
        raise MalformedEvent("event is not an object")
    event_id = raw.get("EventId")
    index_key = raw.get("IndexKey")
    stamp = raw.get("Timestamp")
    ticks = stamp.get("Ticks") if isinstance(stamp, Mapping) else None
    if not isinstance(event_id, str) or not event_id:
        raise MalformedEvent("event has no EventId")
    if not isinstance(index_key, str) or not index_key:
        raise MalformedEvent(f"event {event_id} has no IndexKey")
    if isinstance(ticks, str) and ticks.isdigit():
        ticks = int(ticks)  # the proto3 JSON form of a 64-bit integer
    if not isinstance(ticks, int) or isinstance(ticks, bool):
        raise MalformedEvent(f"event {event_id} has no Timestamp.Ticks")
    document_id = raw.get("DocumentId")
    ids = document_id if isinstance(document_id, Mapping) else {}
    return DocflowEvent(
        event_id=event_id,
        message_id=str(ids.get("MessageId") or ""),
        entity_id=str(ids.get("EntityId") or ""),
        index_key=index_key,
        ticks=ticks,
        document_type=_document_type(raw),
        raw=raw,
    )


def _document_type(raw: Mapping[str, Any]) -> str:
    """``Document.DocumentInfo.FullVersion.TypeNamedId``, where Kontur puts it.

    ``DocumentInfoV3`` and ``DocumentInfoV5`` hold the type in ``FullVersion`` (in
    ``diadoc/diadocsdk-csharp``: ``proto/Docflow/DocumentInfoV5.proto``,
    ``proto/FullVersion.proto``); a flat ``DocumentInfo.TypeNamedId`` is read as a fallback.
    Without ``PopulateDocuments`` there is no document and the type is unknown.
    """
    info = _at(raw, "Document", "DocumentInfo")
    for name in (_at(info, "FullVersion", "TypeNamedId"), _at(info, "TypeNamedId")):
        if isinstance(name, str) and name:
            return name
    return UNKNOWN_TYPE


def _at(value: object, *path: str) -> object:
    for step in path:
        value = value.get(step) if isinstance(value, Mapping) else None
    return value


def routing_word(value: str) -> str:
    """One word of a topic routing key: dots separate words, so none may be inside one."""
    return value.replace(".", "_").replace(" ", "_") or UNKNOWN_TYPE


def to_message(event: DocflowEvent, *, box_id: str, exchange: str) -> OutgoingMessage:
    headers = {
        "x-diadoc-box-id": box_id,
        "x-diadoc-event-id": event.event_id,
        "x-diadoc-message-id": event.message_id,
        "x-diadoc-entity-id": event.entity_id,
        "x-diadoc-document-type": event.document_type,
    }
    return OutgoingMessage(
        exchange=exchange,
        routing_key=f"{routing_word(box_id)}.{routing_word(event.document_type)}",
        body=_dumps(event.raw).encode(),
        # Stable across re-deliveries and re-scans, unique per document: consumers de-duplicate
        # on it.
        message_id=event.key,
        type=event.document_type,
        timestamp=to_datetime(event.ticks),
        headers=headers,
        key=event.key,
    )
