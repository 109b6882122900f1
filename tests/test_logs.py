"""Logs are one JSON object per line and never carry a token or a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge import logs
from bridge.bitrix24 import phpquery
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, free_port
from tests.plugins.broker import AmqpNamespace


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.configure("DEBUG", "json", stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


def test_json_lines_carry_the_extra_fields(captured: io.StringIO) -> None:
    logging.getLogger("bridge.test").info(
        "page published", extra={"portal": "acme", "process_id": "p1", "events": 50}
    )
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "page published"
    assert record["level"] == "info"
    assert (record["portal"], record["process_id"], record["events"]) == ("acme", "p1", 50)


def test_text_format_is_one_line(captured: io.StringIO) -> None:
    logs.configure("INFO", "text", captured)
    logging.getLogger("bridge.test").warning("drain pass failed", extra={"portal": "acme"})
    line = captured.getvalue().strip()
    assert "\n" not in line
    assert "drain pass failed" in line
    assert "portal=acme" in line


async def test_no_secret_reaches_the_logs_or_an_error_body(
    captured: io.StringIO, amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    port = free_port()
    server = EmulatorServer(
        EmulatorConfig(
            handler_url=f"http://127.0.0.1:{port}/bitrix24/events", min_timeout=0, auto_bind=True
        )
    ).start()
    portal = Portal(server.base_url)
    secrets: set[str] = set()
    bodies: list[str] = []
    try:
        app = await portal.app()
        env = await bridge_env(
            portal,
            amqp_ns,
            tmp_path / "s.sqlite3",
            BRIDGE_HTTP_PORT=str(port),
            BRIDGE_LOG_FORMAT="json",
            BRIDGE_LOG_LEVEL="DEBUG",
        )
        secrets |= {app["client_secret"], app["refresh_token"], app["application_token"]}
        async with bridge_in_process(env) as bridge, httpx.AsyncClient() as client:
            await portal.generate("ONCRMLEADADD", 120)
            await portal.faults(expire_tokens=True)  # a refresh, with new tokens, mid-drain
            await portal.generate("ONCRMLEADADD", 120, start_id=1000)
            await portal.wait_empty(timeout=60)
            # Notifications with the tokens a user action adds, right and wrong.
            user_tokens = {
                "access_token": "u-access-" + "9" * 20,
                "refresh_token": "u-refresh-" + "8" * 20,
            }
            secrets |= set(user_tokens.values())
            for token in (app["application_token"], "wrong-" + "7" * 26):
                secrets.add(token)
                form = phpquery.encode(
                    {
                        "event": "ONOFFLINEEVENT",
                        "auth": {
                            "member_id": app["member_id"],
                            "application_token": token,
                            **user_tokens,
                        },
                    }
                )
                response = await client.post(
                    bridge.events_url,
                    content=form,
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
                bodies.append(response.text)
            forged = phpquery.encode(
                {
                    "event": "ONAPPINSTALL",
                    "auth": {
                        "member_id": "m",
                        "refresh_token": "forged-" + "6" * 20,
                        "application_token": "a" * 32,
                    },
                }
            )
            secrets.add("forged-" + "6" * 20)
            response = await client.post(
                bridge.events_url,
                content=forged,
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            bodies.append(response.text)
            for path in ("/readyz", "/livez", "/metrics"):
                bodies.append((await client.get(bridge.url + path)).text)
            assert bridge.service.state is not None
            (stored,) = await bridge.service.state.portals()
            secrets |= {stored.access_token, stored.refresh_token}
    finally:
        await portal.close()
        server.stop()
    output = captured.getvalue()
    assert "token refreshed" in output  # the refresh really happened while we listened
    for line in output.splitlines():
        json.loads(line)  # every line is one JSON object
    for secret in secrets:
        assert secret
        assert secret not in output, "a secret reached the log"
        for body in bodies:
            assert secret not in body, "a secret reached an answer"


def test_json_line_keeps_the_stack_trace(captured: io.StringIO) -> None:
    def fail_deep() -> None:
        raise ValueError("state file is locked")

    try:
        fail_deep()
    except ValueError:
        logging.getLogger("bridge.test").exception("pass failed", extra={"portal": "acme"})
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["error"] == "ValueError: state file is locked"
    trace = record["exception"]
    assert trace.startswith("Traceback (most recent call last):")
    assert "in fail_deep" in trace  # the frame that raised, not only the message
    assert trace.rstrip().endswith("ValueError: state file is locked")


def test_text_format_keeps_the_stack_trace_too(captured: io.StringIO) -> None:
    logs.configure("INFO", "text", captured)
    try:
        empty: dict[str, int] = {}
        empty["missing"]
    except KeyError:
        logging.getLogger("bridge.test").exception("lookup failed")
    text = captured.getvalue()
    assert text.splitlines()[0].endswith("error=KeyError: 'missing'")
    assert "Traceback (most recent call last):" in text


def test_uvicorn_color_message_is_dropped(captured: io.StringIO) -> None:
    # uvicorn passes an ANSI-coloured copy of some messages as extra={"color_message": ...}
    # (uvicorn/server.py, uvicorn/lifespan/on.py); a JSON log has no use for terminal escapes.
    logging.getLogger("tests.uvicorn_like").info(
        "Started server process [%d]",
        42,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "Started server process [42]"
    assert "color_message" not in record
    assert "\x1b" not in line
    assert "\\u001b" not in line

    logs.configure("INFO", "text", captured)
    logging.getLogger("tests.uvicorn_like").info(
        "Waiting for application startup.", extra={"color_message": "\x1b[1mWaiting\x1b[0m"}
    )
    assert "color_message" not in captured.getvalue()
