"""The AsyncAPI 3.0 document of what the bridge publishes, built from its configuration.

One channel per event of ``BRIDGE_EVENTS`` (the routing key is the channel's address, the
exchange is in its AMQP binding), one for the Diadoc exchange when a box is configured, and one
for the unrouted exchange. Message schemas come from :mod:`bridge.message_schemas`. Building it
opens no connection and reads no secret: only names and templates.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Literal

import yaml
from pydantic import ValidationError, model_validator
from yarl import URL

from bridge import __version__
from bridge import message_schemas as schemas
from bridge.core.errors import ConfigError
from bridge.diadoc.messages import routing_word
from bridge.diadoc.settings import DiadocSettings, _describe_diadoc
from bridge.settings import Settings

Document = dict[str, Any]
BINDING_VERSION = schemas.BINDING_VERSION
SERVER = "rabbitmq"

DESCRIPTION = """\
Bitrix24 offline events (and Kontur Diadoc docflow events, when configured) as RabbitMQ
messages. Delivery is at least once: an event is removed from its source only after RabbitMQ
confirmed it, so a crash between the confirm and the removal, a lost confirm or a lost state
file publishes it again, with the same `message_id`, when the bridge restarts or retries
(within minutes). Consumers de-duplicate on `message_id`. Order is kept within one portal (and
within one Diadoc box). Messages no queue is bound for go to the unrouted exchange's queue
instead of being dropped.
"""


class DiadocLayout(DiadocSettings):
    """The Diadoc settings the document needs, read without requiring the credentials."""

    @model_validator(mode="after")
    def _credentials(self) -> DiadocLayout:  # replaces DiadocSettings' check of the same name
        return self


def load_diadoc_layout(env: dict[str, str] | None = None) -> DiadocLayout:
    try:
        if env is None:
            return DiadocLayout()
        prefix = "BRIDGE_DIADOC_"
        values: dict[str, Any] = {
            k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)
        }
        return DiadocLayout(**{"_env_file": None, **values})
    except ValidationError as exc:
        raise ConfigError(_describe_diadoc(exc)) from None


def build(settings: Settings, diadoc: DiadocSettings) -> Document:
    url = URL(settings.amqp_url.get_secret_value())
    vhost = "/" if url.path in ("", "/") else url.path[1:].replace("%2F", "/")
    channels: Document = {}
    operations: Document = {}
    messages: Document = {}
    for event in dict.fromkeys(e.upper() for e in settings.events):
        channel_id = "bitrix24-" + re.sub(r"[^A-Za-z0-9_-]", "_", event.lower())
        messages[event] = schemas.bitrix24_message(event, settings.auth_connector)
        channels[channel_id] = _bitrix24_channel(event, settings, vhost)
        operations[f"send-{channel_id}"] = _operation(channel_id, event)
    if diadoc.enabled:
        messages["diadoc-event"] = schemas.diadoc_message()
        channels["diadoc"] = _diadoc_channel(diadoc, settings.unrouted_exchange, vhost)
        operations["send-diadoc"] = _operation("diadoc", "diadoc-event")
    channels["unrouted"] = _unrouted_channel(settings.unrouted_exchange, list(messages), vhost)
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "bitrix24-bridge", "version": __version__, "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {
            SERVER: {
                "host": f"{url.host}:{url.explicit_port or _default_port(url.scheme)}",
                "protocol": url.scheme,
                "protocolVersion": "0.9.1",
                "description": f"RabbitMQ, virtual host {vhost!r}",
                "security": [{"$ref": "#/components/securitySchemes/user"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "securitySchemes": {"user": {"type": "userPassword", "description": "a RabbitMQ user"}},
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, the way a person would write them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(document: Document, fmt: Literal["yaml", "json"]) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    dumped: str = yaml.dump(
        document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    return dumped


def _default_port(scheme: str) -> int:
    return 5671 if scheme == "amqps" else 5672


def _exchange(name: str, kind: str, vhost: str) -> Document:
    return {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": vhost}


def _routing_binding(name: str, unrouted: str, vhost: str) -> Document:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": _exchange(name, "topic", vhost),
            "x-exchange-arguments": {"alternate-exchange": unrouted},
            "bindingVersion": BINDING_VERSION,
        }
    }


PARAMETERS = {
    "domain": "the portal's host as its client_endpoint names it, with the port if any "
    "(several routing-key words: it contains dots)",
    "member_id": "the portal's member_id",
}


def _bitrix24_channel(event: str, settings: Settings, vhost: str) -> Document:
    lowered = event.lower()
    # {event} is known here; {domain} and {member_id} differ per portal and stay placeholders.
    keep = {"event": lowered, "domain": "{domain}", "member_id": "{member_id}"}
    exchange = settings.exchange_template.format(**keep)
    address = settings.routing_key_template.format(**keep)
    used = {f for _, f, _, _ in string.Formatter().parse(address) if f}
    parameters: Document = {name: {"description": PARAMETERS[name]} for name in sorted(used)}
    if "domain" in parameters and settings.portal_url:
        parameters["domain"]["examples"] = [URL(settings.portal_url).raw_authority]
    description = f"{event} events. Exchange {exchange!r} (topic), routing key {address!r}."
    if "{" in exchange:
        description += " The exchange name holds the portal's domain or member_id."
    channel: Document = {
        "address": address,
        "title": event,
        "description": description,
        "messages": {event: {"$ref": f"#/components/messages/{event}"}},
        "bindings": _routing_binding(exchange, settings.unrouted_exchange, vhost),
    }
    if parameters:
        channel["parameters"] = parameters
    return channel


def _diadoc_channel(diadoc: DiadocSettings, unrouted: str, vhost: str) -> Document:
    return {
        "address": "{box}.{documentType}",
        "title": "Diadoc docflow events",
        "description": f"Docflow events of every configured box. Exchange {diadoc.exchange!r} "
        "(topic); bind '<box>.#' for one box, '*.<type>' for one document type, '#' for all.",
        "parameters": {
            "box": {
                "description": "the box id, dots and spaces replaced by '_'",
                "enum": [routing_word(box) for box in diadoc.boxes],
            },
            "documentType": {
                "description": "Document.DocumentInfo.FullVersion.TypeNamedId "
                "('unknown' when absent)",
                "examples": ["UniversalTransferDocument", "Nonformalized"],
            },
        },
        "messages": {"diadoc-event": {"$ref": "#/components/messages/diadoc-event"}},
        "bindings": _routing_binding(diadoc.exchange, unrouted, vhost),
    }


def _unrouted_channel(name: str, message_ids: list[str], vhost: str) -> Document:
    return {
        "address": None,  # a fanout exchange: messages keep the routing key they were sent with
        "title": "unrouted",
        "description": f"Messages no queue was bound for, through the alternate exchange "
        f"{name!r} (fanout) into the durable queue {name!r}, which the bridge declares.",
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in message_ids},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": _exchange(name, "fanout", vhost),
                "x-queue": {"name": name, "durable": True},
                "bindingVersion": BINDING_VERSION,
            }
        },
    }


def _operation(channel_id: str, message_id: str) -> Document:
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
        "bindings": {
            "amqp": {
                "deliveryMode": 2,
                "mandatory": True,
                "timestamp": True,
                "bindingVersion": BINDING_VERSION,
            }
        },
    }
