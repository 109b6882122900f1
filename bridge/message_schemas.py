"""JSON Schemas (draft-07) of what the bridge publishes: AMQP properties, headers and body, and
the AsyncAPI message objects that carry them.

They describe ``bridge/messages.py`` (Bitrix24) and ``bridge/diadoc/messages.py`` (Diadoc); the
AsyncAPI document embeds them, and the tests hold real published messages against them, so a
change of either side that the other does not follow fails a test.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

APP_ID = "bitrix24-bridge"
BINDING_VERSION = "0.3.0"  # of AsyncAPI's AMQP bindings
MD5_HEX = "^[0-9a-f]{32}$"
# Bitrix24's TIMESTAMP_X: ISO 8601, whole seconds, with the portal's offset.
BITRIX24_FIELDS = (
    "ID",
    "TIMESTAMP_X",
    "EVENT_NAME",
    "EVENT_DATA",
    "EVENT_ADDITIONAL",
    "MESSAGE_ID",
)
ISO_SECONDS = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$"


def _string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def properties_schema(*, type_: Schema, message_id: Schema) -> Schema:
    """The AMQP basic properties every message carries (``timestamp`` in Unix seconds)."""
    return {
        "type": "object",
        "required": ["content_type", "delivery_mode", "message_id", "type", "app_id"],
        "additionalProperties": False,
        "properties": {
            "content_type": {"const": "application/json"},
            "delivery_mode": {"const": 2, "description": "persistent"},
            "message_id": message_id,
            "type": type_,
            "app_id": {"const": APP_ID},
            "timestamp": {
                "type": "integer",
                "description": "when the event happened, Unix seconds; absent if unknown",
            },
        },
    }


# -- Bitrix24 -------------------------------------------------------------------------------


def bitrix24_properties(event: str) -> Schema:
    return properties_schema(
        type_={"const": event, "description": "EVENT_NAME"},
        message_id=_string(
            "{member_id}:{ID}:{TIMESTAMP_X}: the same on every delivery of one event, "
            "different for a later change of the same object; de-duplicate on it",
            pattern="^[^:]+:[^:]+:.+$",
        ),
    )


def bitrix24_headers(event: str, connector: str) -> Schema:
    required = [
        "x-bitrix24-domain",
        "x-bitrix24-member-id",
        "x-bitrix24-event",
        "x-bitrix24-event-id",
        "x-bitrix24-message-id",
    ]
    properties: Schema = {
        "x-bitrix24-domain": _string(
            "the portal's host as its client_endpoint names it (with the port, if any)"
        ),
        "x-bitrix24-member-id": _string("the portal's member_id"),
        "x-bitrix24-event": {"const": event, "description": "EVENT_NAME"},
        "x-bitrix24-event-id": _string("ID of the offline event row", pattern="^[0-9]+$"),
        "x-bitrix24-message-id": _string(
            "MESSAGE_ID: md5 of the event name and data; equal for identical changes",
            pattern=MD5_HEX,
        ),
    }
    if connector:
        required.append("x-bitrix24-connector")
        properties["x-bitrix24-connector"] = {
            "const": connector,
            "description": "the auth_connector whose offline queue the event came from",
        }
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }


def bitrix24_payload(event: str) -> Schema:
    # The row exactly as event.offline.get returned it: Bitrix24 may add fields, so the object
    # stays open.
    return {
        "type": "object",
        "required": list(BITRIX24_FIELDS),
        "properties": {
            "ID": {
                "type": ["string", "integer"],
                "pattern": "^[0-9]+$",
                "description": "the row's id in the portal's offline queue (increasing)",
            },
            "TIMESTAMP_X": _string(
                "when the object last changed (a later change of a queued object moves it)",
                format="date-time",
                pattern=ISO_SECONDS,
            ),
            "EVENT_NAME": {"const": event},
            "EVENT_DATA": {
                "type": ["object", "array", "boolean"],
                "description": 'the event\'s data, e.g. {"FIELDS": {"ID": "7405"}}; '
                "false or [] when the event has none",
            },
            "EVENT_ADDITIONAL": {
                "type": ["object", "array"],
                "description": 'who caused it, e.g. {"user_id": "1"}',
            },
            "MESSAGE_ID": _string("md5 of EVENT_NAME and EVENT_DATA", pattern=MD5_HEX),
        },
    }


# -- Diadoc ---------------------------------------------------------------------------------


def diadoc_properties() -> Schema:
    return properties_schema(
        type_=_string("the document's TypeNamedId, 'unknown' when Diadoc gave none"),
        message_id=_string(
            "{EventId}:{EntityId} (or EventId alone): the same on every delivery; "
            "de-duplicate on it",
            minLength=1,
        ),
    )


def diadoc_headers() -> Schema:
    names = {
        "x-diadoc-box-id": "the box the event belongs to",
        "x-diadoc-event-id": "EventId",
        "x-diadoc-message-id": "DocumentId.MessageId (may be empty)",
        "x-diadoc-entity-id": "DocumentId.EntityId (may be empty)",
        "x-diadoc-document-type": "Document.DocumentInfo.FullVersion.TypeNamedId, or 'unknown'",
    }
    return {
        "type": "object",
        "required": list(names),
        "additionalProperties": False,
        "properties": {name: _string(text) for name, text in names.items()},
    }


def diadoc_payload() -> Schema:
    # A DocflowEventV5 as GetDocflowEvents (V5) returns it (Kontur's diadocsdk-csharp,
    # proto/Docflow/DocflowApiV5.proto), passed through untouched.
    document_id: Schema = {
        "type": "object",
        "properties": {"MessageId": {"type": "string"}, "EntityId": {"type": "string"}},
    }
    return {
        "type": "object",
        "required": ["EventId", "IndexKey", "Timestamp"],
        "properties": {
            "EventId": _string("the change's id, shared by every document it touched", minLength=1),
            "IndexKey": _string("the event's position in the box's feed", minLength=1),
            "Timestamp": {
                "type": "object",
                "required": ["Ticks"],
                "properties": {
                    "Ticks": {
                        "type": "integer",
                        "description": ".NET ticks: 100 ns units since 0001-01-01 UTC",
                    }
                },
            },
            "DocumentId": document_id,
            "PreviousEventId": {"type": "string"},
            "Document": {
                "type": "object",
                "description": "the document after the event (DocumentWithDocflowV5); present "
                "when BRIDGE_DIADOC_POPULATE_DOCUMENTS is on (late events found by the re-scan "
                "may lack it)",
                "properties": {
                    "DocumentId": document_id,
                    "DocumentInfo": {
                        "type": "object",
                        "properties": {
                            "FullVersion": {
                                "type": "object",
                                "properties": {"TypeNamedId": {"type": "string"}},
                            }
                        },
                    },
                },
            },
            "PreviousDocumentState": {"type": "object"},
        },
    }


# -- as AsyncAPI message objects ----------------------------------------------------------------


def _message(name: str, title: str, headers: Schema, payload: Schema, props: Schema) -> Schema:
    # AsyncAPI's `headers` are the application headers (the AMQP headers table); the basic
    # properties have no field of their own, hence the `x-amqp-properties` extension.
    return {
        "name": name,
        "title": title,
        "contentType": "application/json",
        "headers": headers,
        "payload": payload,
        "x-amqp-properties": props,
    }


def bitrix24_message(event: str, connector: str) -> Schema:
    message = _message(
        event,
        f"Bitrix24 {event}",
        bitrix24_headers(event, connector),
        bitrix24_payload(event),
        bitrix24_properties(event),
    )
    message["bindings"] = {"amqp": {"messageType": event, "bindingVersion": BINDING_VERSION}}
    return message


def diadoc_message() -> Schema:
    # No AMQP messageType: it is the document type, which varies.
    return _message(
        "diadoc-event",
        "Diadoc docflow event",
        diadoc_headers(),
        diadoc_payload(),
        diadoc_properties(),
    )
