"""One stored docflow event of the emulated Diadoc, and its JSON the way Kontur serves it.

The shape follows Kontur's proto definitions (``diadoc/diadocsdk-csharp``, ``proto/``):
``DocflowEventV5`` (``Docflow/DocflowApiV5.proto``) → ``DocumentWithDocflowV5`` →
``DocumentInfoV5`` → ``FullVersion`` (``FullVersion.proto``: ``TypeNamedId``, ``Function``,
``Version``). Versions 3 and 4 carry ``DocumentInfoV3``, which differs only in its participants.
Enums are numbers, as in Kontur's JSON examples; ``IndexKey`` (``bytes``) is base64.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

_KEY = struct.Struct(">qQ")
HEAD_DEPARTMENT = "00000000-0000-0000-0000-000000000000"  # the organisation itself
COUNTERPARTY_BOX = "5c2bb1a1-0d3c-4a66-9d5e-1d2f3a4b5c6d"
INBOUND, LETTER, LOCK_NONE = 1, 1, 1  # DocumentDirection, MessageType, LockMode
SENDER, RECIPIENT = 1, 3  # Workflows.ParticipantType

# What ``defect`` breaks in an event, to test how a reader copes with a malformed one.
DEFECTS = ("no_event_id", "bad_timestamp", "not_an_object", "no_index_key")


def encode_index_key(ticks: int, seq: int) -> str:
    return base64.b64encode(_KEY.pack(ticks, seq)).decode()


def decode_index_key(key: str) -> tuple[int, int]:
    try:
        raw = base64.b64decode(key.encode(), validate=True)
        ticks, seq = _KEY.unpack(raw)
    except (binascii.Error, struct.error, ValueError) as exc:
        raise ValueError("IndexKey is malformed") from exc
    return ticks, seq


@dataclass(frozen=True, slots=True)
class StoredEvent:
    ticks: int
    seq: int  # arrival order, unique
    event_id: str
    message_id: str
    entity_id: str
    document_type: str
    # The IndexKey's own sequence number: events of one change may share it (a tie), and then
    # ``AfterIndexKey`` skips all of them at once.
    key_seq: int = 0
    department_id: str = HEAD_DEPARTMENT
    previous_event_id: str | None = None
    defect: str | None = None

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.ticks, self.key_seq or self.seq, self.seq)

    @property
    def position(self) -> tuple[int, int]:
        """What ``AfterIndexKey`` compares: ties have the same position."""
        return (self.ticks, self.key_seq or self.seq)

    @property
    def index_key(self) -> str:
        return encode_index_key(*self.position)

    @property
    def key(self) -> str:
        return f"{self.event_id}:{self.entity_id}"

    def as_json(self, *, populate: bool, version: int, box_id: str) -> Any:
        document_id = {"MessageId": self.message_id, "EntityId": self.entity_id}
        event: dict[str, Any] = {
            "EventId": self.event_id,
            "Timestamp": {"Ticks": self.ticks},
            "DocumentId": document_id,
            "IndexKey": self.index_key,
        }
        if self.previous_event_id:
            event["PreviousEventId"] = self.previous_event_id
        if populate:
            event["Document"] = {
                "DocumentId": document_id,
                "LastEvent": {"EventId": self.event_id, "Timestamp": {"Ticks": self.ticks}},
                "DocumentInfo": self._info(version, box_id),
                "Docflow": {"Titles": [], "DocflowStatus": {"PrimaryStatus": {"Severity": "Info"}}},
            }
        return self._break(event)

    def _info(self, version: int, box_id: str) -> dict[str, Any]:
        if version >= 5:  # DocumentParticipantsV2
            flags = {"IsRoaming": False, "IsCrossborder": False, "IsForeign": False}
            participants: dict[str, Any] = {
                "Participants": [
                    {"BoxId": COUNTERPARTY_BOX, "Role": "Seller", "Flags": flags,
                     "Type": SENDER, "IsCurrentBox": False},
                    {"BoxId": box_id, "DepartmentId": self.department_id, "Role": "Buyer",
                     "Flags": flags, "Type": RECIPIENT, "IsCurrentBox": True},
                ]
            }  # fmt: skip
        else:  # DocumentParticipants of DocumentInfoV3
            participants = {
                "Sender": {"BoxId": COUNTERPARTY_BOX, "IsRoaming": False},
                "Recipient": {"BoxId": box_id, "DepartmentId": self.department_id,
                              "IsRoaming": False},
                "IsInternal": False,
                "IsCrossBorder": False,
            }  # fmt: skip
        return {
            "FullVersion": {
                "TypeNamedId": self.document_type,
                "Function": "default",
                "Version": "v1",
            },
            "MessageType": LETTER,
            "WorkflowId": 1,
            "Participants": participants,
            "DocumentDirection": INBOUND,
            "DepartmentId": self.department_id,
            "Metadata": [],
            "CustomData": [],
            "DocumentLinks": {"InitialIds": [], "SubordinateIds": []},
            "PacketInfo": {"LockMode": LOCK_NONE},
            "IsRead": False,
            "IsDeleted": False,
            "IsInvitation": False,
        }

    def _break(self, event: dict[str, Any]) -> Any:
        if self.defect == "no_event_id":
            del event["EventId"]
        elif self.defect == "bad_timestamp":
            event["Timestamp"] = "yesterday"
        elif self.defect == "no_index_key":
            del event["IndexKey"]
        elif self.defect == "not_an_object":
            return [event["EventId"], event["IndexKey"]]
        return event

    def summary(self) -> dict[str, Any]:
        return {
            "EventId": self.event_id,
            "MessageId": self.message_id,
            "EntityId": self.entity_id,
            "key": self.key,
            "ticks": self.ticks,
            "IndexKey": self.index_key,
            "document_type": self.document_type,
            "department_id": self.department_id,
            "defect": self.defect,
        }
