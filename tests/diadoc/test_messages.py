"""A Diadoc event as the bridge reads it: the document type where Kontur puts it, and what makes
an event malformed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bridge.diadoc.messages import (
    MAX_REJECT_BODY,
    UNKNOWN_TYPE,
    MalformedEvent,
    Reject,
    parse_event,
    to_message,
)

EVENT_ID = "8302584b-575d-49e1-98a0-705b08ade88c"
MESSAGE_ID = "6d66b731-275c-4dab-8e6f-263787edd2ee"
ENTITY_ID = "68ecc429-48ca-4536-8e9c-50e0be5183f3"
BOX = "4ed48394-1516-4bda-83cc-0d397133d7fe"
TICKS = 638324326627158244


def kontur_v5_event() -> dict[str, Any]:
    """One DocflowEventV5 with its document, field by field as Kontur's proto files define it.

    Sources, all in diadoc/diadocsdk-csharp:
    - proto/Docflow/DocflowApiV5.proto: DocflowEventV5 {EventId, Timestamp, DocumentId,
      IndexKey (bytes: base64 in JSON), Document, PreviousEventId, PreviousDocumentState}
    - proto/Docflow/DocumentWithDocflowV5.proto: {DocumentId, LastEvent, DocumentInfo, Docflow}
    - proto/Docflow/DocumentInfoV5.proto: DocumentInfoV5 {FullVersion, MessageType, WorkflowId,
      Participants, DocumentDirection, DepartmentId, ..., DocumentLinks, PacketInfo, IsRead,
      IsDeleted, IsInvitation, ...}
    - proto/FullVersion.proto: {TypeNamedId, Function, Version}
    - proto/Timestamp.proto: {Ticks (sfixed64)}; proto/DocumentId.proto: {MessageId, EntityId}
    - proto/Documents/DocumentParticipantV2.proto, proto/Docflow/LastEvent.proto,
      proto/DocflowStatusV3.proto
    The EventId, Ticks, IndexKey and box id are those of a real event quoted in
    diadoc/diadocsdk-csharp issue 1083; the message and entity ids are from diadoc/diadocapi-docs
    docs/source/howto/example_receive_invoice.rst; the function and version of a UTD from its
    docs/source/ReleaseNotes.rst.
    """
    document_id = {"MessageId": MESSAGE_ID, "EntityId": ENTITY_ID}
    flags = {"IsRoaming": False, "IsCrossborder": False, "IsForeign": False}
    return {
        "EventId": EVENT_ID,
        "Timestamp": {"Ticks": TICKS},
        "DocumentId": document_id,
        "IndexKey": "CNvIl9RK0Ik=",
        "Document": {
            "DocumentId": document_id,
            "LastEvent": {"EventId": EVENT_ID, "Timestamp": {"Ticks": TICKS}},
            "DocumentInfo": {
                "FullVersion": {
                    "TypeNamedId": "UniversalTransferDocument",
                    "Function": "СЧФДОП",
                    "Version": "utd820_05_01_01_hyphen",
                },
                "MessageType": 1,
                "WorkflowId": 1,
                "Participants": {
                    "Participants": [
                        {"BoxId": "2901893d-52ad-47dc-a1fd-984461e29ffb", "Role": "Seller",
                         "Flags": flags, "Type": 1, "IsCurrentBox": False},
                        {"BoxId": BOX, "Role": "Buyer", "Flags": flags, "Type": 3,
                         "IsCurrentBox": True},
                    ]
                },
                "DocumentDirection": 1,
                "DepartmentId": "00000000-0000-0000-0000-000000000000",
                "Metadata": [{"Key": "DocumentNumber", "Value": "42"}],
                "CustomData": [],
                "DocumentLinks": {"InitialIds": [], "SubordinateIds": []},
                "PacketInfo": {"LockMode": 1},
                "IsRead": False,
                "IsDeleted": False,
                "IsInvitation": False,
            },
            "Docflow": {"Titles": [], "DocflowStatus": {"PrimaryStatus": {"Severity": "Info"}}},
        },
    }  # fmt: skip


def test_document_type_comes_from_full_version() -> None:
    event = parse_event(kontur_v5_event())
    assert event.document_type == "UniversalTransferDocument"
    assert (event.event_id, event.message_id, event.entity_id) == (EVENT_ID, MESSAGE_ID, ENTITY_ID)
    assert event.ticks == TICKS
    message = to_message(event, box_id=BOX, exchange="diadoc.events")
    assert message.routing_key == f"{BOX}.UniversalTransferDocument"
    assert message.headers["x-diadoc-document-type"] == "UniversalTransferDocument"
    assert message.type == "UniversalTransferDocument"
    assert json.loads(message.body) == kontur_v5_event()  # forwarded as received


def test_a_flat_type_is_read_when_there_is_no_full_version() -> None:
    raw = kontur_v5_event()
    info = raw["Document"]["DocumentInfo"]
    del info["FullVersion"]
    info["TypeNamedId"] = "Invoice"
    assert parse_event(raw).document_type == "Invoice"


def test_without_a_document_the_type_is_unknown() -> None:
    raw = kontur_v5_event()
    del raw["Document"]  # PopulateDocuments=false
    assert parse_event(raw).document_type == UNKNOWN_TYPE


def test_ticks_in_the_proto3_string_form_are_read() -> None:
    raw = kontur_v5_event()
    raw["Timestamp"] = {"Ticks": str(TICKS)}
    assert parse_event(raw).ticks == TICKS


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda e: e.pop("EventId"), "no EventId"),
        (lambda e: e.update(IndexKey=""), "no IndexKey"),
        (lambda e: e.update(Timestamp="yesterday"), "no Timestamp.Ticks"),
        (lambda e: e.update(Timestamp={"Ticks": True}), "no Timestamp.Ticks"),
    ],
)
def test_malformed_events_say_why(mangle: Callable[[dict[str, Any]], object], reason: str) -> None:
    raw = kontur_v5_event()
    mangle(raw)
    with pytest.raises(MalformedEvent, match=reason):
        parse_event(raw)


def test_a_reject_keeps_enough_to_find_and_inspect_the_event() -> None:
    raw = kontur_v5_event()
    raw["Timestamp"] = "yesterday"
    with pytest.raises(MalformedEvent) as info:
        parse_event(raw)
    reject = Reject.of(raw, info.value)
    assert reject.index_key == "CNvIl9RK0Ik="
    assert "Timestamp" in reject.reason
    assert json.loads(reject.body) == raw
    assert reject.fingerprint == Reject.of(json.loads(reject.body), info.value).fingerprint
    bare = {k: v for k, v in raw.items() if k != "Document"}  # as the re-scan reads it
    assert Reject.of(bare, info.value).fingerprint == reject.fingerprint
    other = {**bare, "EventId": "another"}
    assert Reject.of(other, info.value).fingerprint != reject.fingerprint
    huge = Reject.of({"EventId": "x" * (2 * MAX_REJECT_BODY)}, info.value)
    assert len(huge.body) == MAX_REJECT_BODY
    assert huge.index_key is None
    assert Reject.of(["not", "an", "object"], info.value).index_key is None
