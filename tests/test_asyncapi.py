"""The AsyncAPI document: what ``bitrix24-bridge asyncapi`` prints, checked by the official parser
and against messages the bridge really published.

The parser is ``@asyncapi/parser`` from the npm registry (github.com/asyncapi/parser-js; its
``Parser().parse`` returns ``{document, diagnostics}`` with Spectral severities 0 error,
1 warning, 2 information, 3 hint), run with the machine's Node.js from a cache directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage

from bridge.asyncapi import build, load_diadoc_layout, render
from bridge.core.errors import ConfigError
from bridge.emulators.bitrix24 import EmulatorServer
from bridge.emulators.diadoc import DiadocEmulator, DiadocEmulatorServer
from bridge.settings import load_settings
from tests.harness import Portal, bridge_env, bridge_in_process
from tests.plugins.broker import AmqpNamespace

PARSER = "@asyncapi/parser@3.6.6"
NPM_FLAGS = ("--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error")
VALIDATE_JS = Path(__file__).parent / "asyncapi" / "validate.cjs"
# Information, not a warning: the issue asks for AsyncAPI 3.0 and 3.1 is out.
ALLOWED_INFO = {"asyncapi-latest-version"}

Validate = Callable[[str], dict[str, Any]]


def _parser_dir() -> Path:
    base = os.environ.get("BRIDGE_TEST_NODE_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "bitrix24-bridge"
    return root / PARSER.replace("/", "+")


def _unavailable(reason: str) -> None:
    if os.environ.get("BRIDGE_TEST_REQUIRE_BROKER") == "1":
        pytest.fail(f"{reason}; CI requires it (BRIDGE_TEST_REQUIRE_BROKER=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def asyncapi_parser() -> Validate:
    """``validate(text)``: the parser's verdict on a document, installed on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("Node.js and npm are needed to run @asyncapi/parser (apt-get install npm)")
    assert node is not None
    assert npm is not None
    target = _parser_dir()
    if not (target / "node_modules" / "@asyncapi" / "parser").is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".install-"))
        # --ignore-scripts: the parser needs none; a dependency's postinstall only phones home.
        result = subprocess.run(
            [npm, "install", "--prefix", str(staging), *NPM_FLAGS, PARSER],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            _unavailable(f"npm install {PARSER} failed: {result.stderr.strip()[-500:]}")
        try:
            staging.rename(target)
        except OSError:  # installed meanwhile by another run
            shutil.rmtree(staging, ignore_errors=True)

    def validate(text: str) -> dict[str, Any]:
        env = {**os.environ, "NODE_PATH": str(target / "node_modules")}
        done = subprocess.run(
            [node, str(VALIDATE_JS)],
            input=text,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        verdict: dict[str, Any] = json.loads(done.stdout)
        return verdict

    return validate


def problems(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors, warnings, and any information beyond the one expected."""
    return [
        d
        for d in verdict["diagnostics"]
        if d["severity"] <= 1 or (d["severity"] == 2 and d["code"] not in ALLOWED_INFO)
    ]


def run_cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "asyncapi", *args],
        env={**clean, **env},
        cwd=tmp_path,  # no .env file of the developer's
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


FULL = {
    "BRIDGE_EVENTS": "ONCRMLEADADD,onCrmDealUpdate",
    "BRIDGE_AUTH_CONNECTOR": "crm-sync",
    # An unreachable broker with a password: the command neither connects nor prints it.
    "BRIDGE_AMQP_URL": "amqps://bridge:s3cr3t-pw@127.0.0.1:1/crm%2Fevents",
    "BRIDGE_PORTAL_URL": "http://127.0.0.1:8090",
    "BRIDGE_REFRESH_TOKEN": "refresh-t0ken",
    "BRIDGE_APPLICATION_TOKEN": "app-t0ken",
    # Diadoc boxes without their credentials: the document does not need them.
    "BRIDGE_DIADOC_BOXES": "box-a,org.box-b",
}


@pytest.mark.parametrize(
    ("env", "fmt"),
    [
        ({}, "yaml"),
        (FULL, "json"),
        (
            {
                "BRIDGE_EVENTS": "ONCRMLEADADD",
                "BRIDGE_EXCHANGE_TEMPLATE": "crm.{domain}.{event}",
                "BRIDGE_ROUTING_KEY_TEMPLATE": "{event}.{member_id}.{domain}",
            },
            "yaml",
        ),
    ],
    ids=["defaults", "everything", "templates"],
)
def test_the_printed_document_validates_without_warnings(
    asyncapi_parser: Validate, tmp_path: Path, env: dict[str, str], fmt: str
) -> None:
    done = run_cli(tmp_path, env, "--format", fmt)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout) if fmt == "json" else yaml.safe_load(done.stdout)
    assert document["asyncapi"] == "3.0.0"
    verdict = asyncapi_parser(done.stdout)
    assert verdict["parsed"], verdict
    assert problems(verdict) == []
    for secret in ("s3cr3t-pw", "refresh-t0ken", "app-t0ken", "bridge:"):
        assert secret not in done.stdout


def test_the_parser_does_report_a_broken_document(asyncapi_parser: Validate) -> None:
    """The check above can fail: the same document with one binding wrong is refused."""
    document = build(load_settings(FULL), load_diadoc_layout(FULL))
    document["channels"]["diadoc"]["bindings"]["amqp"]["exchange"]["type"] = "round-robin"
    verdict = asyncapi_parser(render(document, "yaml"))
    assert not verdict["parsed"]
    errors = [d["path"] for d in problems(verdict) if d["severity"] == 0]
    assert "channels/diadoc/bindings/amqp/exchange/type" in errors, verdict


def test_channels_follow_the_configuration() -> None:
    document = build(load_settings(FULL), load_diadoc_layout(FULL))
    channels = document["channels"]
    assert list(channels) == [
        "bitrix24-oncrmleadadd",
        "bitrix24-oncrmdealupdate",
        "diadoc",
        "unrouted",
    ]
    deal = channels["bitrix24-oncrmdealupdate"]
    assert deal["address"] == "{domain}"
    assert deal["parameters"]["domain"]["examples"] == ["127.0.0.1:8090"]
    amqp = deal["bindings"]["amqp"]
    assert amqp["exchange"] == {
        "name": "bitrix24.oncrmdealupdate",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "crm/events",
    }
    assert amqp["x-exchange-arguments"] == {"alternate-exchange": "bitrix24.unrouted"}
    assert channels["diadoc"]["parameters"]["box"]["enum"] == ["box-a", "org_box-b"]
    assert channels["unrouted"]["bindings"]["amqp"]["exchange"]["type"] == "fanout"
    assert set(channels["unrouted"]["messages"]) == {"ONCRMLEADADD", "ONCRMDEALUPDATE"} | {
        "diadoc-event"
    }
    server = document["servers"]["rabbitmq"]
    assert (server["host"], server["protocol"]) == ("127.0.0.1:1", "amqps")
    headers = document["components"]["messages"]["ONCRMDEALUPDATE"]["headers"]
    assert "x-bitrix24-connector" in headers["required"]

    bare = build(load_settings({}), load_diadoc_layout({}))
    assert list(bare["channels"]) == ["unrouted"]
    assert bare["servers"]["rabbitmq"]["host"] == "127.0.0.1:5672"


def test_templates_leave_per_portal_placeholders_as_parameters() -> None:
    env = {
        "BRIDGE_EVENTS": "ONCRMLEADADD",
        "BRIDGE_EXCHANGE_TEMPLATE": "crm.{domain}.{event}",
        "BRIDGE_ROUTING_KEY_TEMPLATE": "{event}.{member_id}",
    }
    channel = build(load_settings(env), load_diadoc_layout({}))["channels"]["bitrix24-oncrmleadadd"]
    assert channel["address"] == "oncrmleadadd.{member_id}"
    assert set(channel["parameters"]) == {"member_id"}
    assert channel["bindings"]["amqp"]["exchange"]["name"] == "crm.{domain}.oncrmleadadd"


def test_bad_configuration_is_one_line_and_prints_no_document(tmp_path: Path) -> None:
    done = run_cli(tmp_path, {"BRIDGE_EXCHANGE_TEMPLATE": "x.{nope}"})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "BRIDGE_EXCHANGE_TEMPLATE" in done.stderr
    with pytest.raises(ConfigError, match="BRIDGE_DIADOC_BOXES"):
        load_diadoc_layout({"BRIDGE_DIADOC_BOXES": "a,a"})
    assert run_cli(tmp_path, {}, "--format", "xml").returncode == 2


# -- the document against what the bridge publishes -----------------------------------------

BOX = "box-a"


@pytest.fixture
def diadoc() -> Iterator[DiadocEmulatorServer]:
    with DiadocEmulatorServer(DiadocEmulator((BOX,))) as server:
        yield server


def amqp_properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    """Every AMQP basic property the message carries (headers aside), by its AMQP name."""
    stamp = message.timestamp
    found = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "delivery_mode": None if message.delivery_mode is None else int(message.delivery_mode),
        "priority": message.priority or None,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "expiration": message.expiration,
        "message_id": message.message_id,
        "timestamp": None if stamp is None else int(stamp.timestamp()),
        "type": message.type,
        "user_id": message.user_id,
        "app_id": message.app_id,
    }
    return {k: v for k, v in found.items() if v is not None}


def address_pattern(address: str, parameters: dict[str, Any]) -> re.Pattern[str]:
    """The channel's address as a regex: a parameter is any non-empty text (enum if given)."""
    parts = re.split(r"\{(\w+)\}", address)
    regex = ""
    for index, part in enumerate(parts):
        if index % 2 == 0:
            regex += re.escape(part)
        else:
            allowed = parameters[part].get("enum")
            regex += "(" + "|".join(map(re.escape, allowed)) + ")" if allowed else "(.+)"
    return re.compile(regex)


def check_against(document: dict[str, Any], message: AbstractIncomingMessage) -> str:
    """Validate one delivered message against the document; returns its channel's id."""
    by_exchange = {
        c["bindings"]["amqp"]["exchange"]["name"]: key
        for key, c in document["channels"].items()
        if key != "unrouted"
    }
    channel_id: str = by_exchange[message.exchange]
    channel = document["channels"][channel_id]
    pattern = address_pattern(channel["address"], channel.get("parameters", {}))
    assert pattern.fullmatch(message.routing_key or ""), (channel["address"], message.routing_key)
    (name,) = channel["messages"]
    spec = document["components"]["messages"][name]
    jsonschema.validate(dict(message.headers), spec["headers"], jsonschema.Draft7Validator)
    jsonschema.validate(amqp_properties(message), spec["x-amqp-properties"])
    jsonschema.validate(json.loads(message.body), spec["payload"], jsonschema.Draft7Validator)
    assert spec["contentType"] == message.content_type
    return channel_id


@pytest.mark.parametrize("connector", ["", "crm-sync"])
async def test_published_messages_match_the_document(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    diadoc: DiadocEmulatorServer,
    tmp_path: Path,
    connector: str,
) -> None:
    _, portal, port = emulated
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_EVENTS="ONCRMLEADADD,ONCRMDEALUPDATE",
        BRIDGE_AUTH_CONNECTOR=connector,
        BRIDGE_POLL_INTERVAL="0.5",
        **diadoc.env((BOX,)),
        BRIDGE_DIADOC_EXCHANGE=f"{amqp_ns.prefix}.diadoc.events",
        BRIDGE_DIADOC_POLL_INTERVAL="0.2",
    )
    document = build(load_settings(env), load_diadoc_layout(env))
    exchanges = {
        key: c["bindings"]["amqp"]["exchange"]["name"] for key, c in document["channels"].items()
    }
    # ONCRMDEALUPDATE gets no queue: its messages must arrive through the unrouted channel.
    lead = await amqp_ns.consume(exchanges["bitrix24-oncrmleadadd"])
    docflow = await amqp_ns.consume(exchanges["diadoc"])
    async with bridge_in_process(env):
        # The bridge declared the unrouted queue before it started serving.
        unrouted = await amqp_ns.consume_queue(exchanges["unrouted"])
        events = [
            {"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": "7"}}, "user_id": 3},
            {"event": "ONCRMLEADADD", "data": False},
            {"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "9"}}},
        ]
        async with httpx.AsyncClient(base_url=portal.base_url) as http:
            answer = await http.post(
                "/_emulator/events", json={"events": events, "connector": connector}
            )
            assert answer.json()["added"] == 3
        diadoc.model.add_events(BOX, count=2, documents=2)
        diadoc.model.add_events(BOX, count=1, document_type="Nonformalized")
        await lead.wait_for(2, timeout=30)
        await unrouted.wait_for(1, timeout=30)
        await docflow.wait_for(5, timeout=30)

    seen = {check_against(document, m) for m in [*lead.messages, *docflow.messages]}
    assert seen == {"bitrix24-oncrmleadadd", "diadoc"}
    (stray,) = unrouted.messages
    assert check_against(document, stray) == "bitrix24-oncrmdealupdate"
    assert stray.type in document["channels"]["unrouted"]["messages"]
    assert ("x-bitrix24-connector" in lead.messages[0].headers) == bool(connector)
