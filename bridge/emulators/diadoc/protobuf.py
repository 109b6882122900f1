"""The protobuf answer Diadoc gives a client that did not ask for JSON.

Kontur's API answers Protocol Buffers unless the request says ``Accept: application/json``
(``diadoc/diadocapi-docs``, ``docs/source/DataStructures.rst``). The emulator does the same, so a
client that forgets the header fails in tests and not in production. Only the wire format of
``GetDocflowEventsResponseV5`` and the core of ``DocflowEventV5`` (``Docflow/DocflowApiV5.proto``
of ``diadoc/diadocsdk-csharp``) is written; document states are left out.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from bridge.emulators.diadoc.faults import Answer

CONTENT_TYPE = "application/x-protobuf"
_VARINT, _FIXED64, _BYTES = 0, 1, 2


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are ten-byte varints
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _tag(field, _BYTES) + _varint(len(data)) + data


def _text(field: int, value: object) -> bytes:
    return _bytes(field, str(value).encode()) if isinstance(value, str) else b""


def _event(event: Mapping[str, Any]) -> bytes:
    out = _text(1, event.get("EventId"))
    stamp = event.get("Timestamp")
    if isinstance(stamp, Mapping) and isinstance(stamp.get("Ticks"), int):
        out += _bytes(2, _tag(1, _FIXED64) + struct.pack("<q", stamp["Ticks"]))
    ids = event.get("DocumentId")
    if isinstance(ids, Mapping):
        out += _bytes(3, _text(1, ids.get("MessageId")) + _text(2, ids.get("EntityId")))
    key = event.get("IndexKey")
    if isinstance(key, str):
        out += _bytes(4, base64.b64decode(key))
    return out + _text(6, event.get("PreviousEventId"))


def encode_events_response(body: Mapping[str, Any]) -> bytes:
    """``GetDocflowEventsResponseV5`` from the JSON the emulator would have answered."""
    out = b""
    if isinstance(body.get("TotalCount"), int):
        out += _tag(1, _VARINT) + _varint(body["TotalCount"])
    events: Iterable[Any] = body.get("Events") or ()
    for event in events:
        if isinstance(event, Mapping):
            out += _bytes(2, _event(event))
    kind = body.get("TotalCountType")
    return out + _tag(3, _VARINT) + _varint(kind if isinstance(kind, int) else 0)


def as_protobuf(answer: Answer) -> Answer:
    raw = encode_events_response(answer.body)
    return Answer(answer.status, None, answer.headers, raw=raw, media_type=CONTENT_TYPE)
