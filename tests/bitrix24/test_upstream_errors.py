"""Every Bitrix24 error code of the protocol table ends in the right class and action.

Decided on ``error``, never on the HTTP status (statuses differ between portal versions).
Source of the table: the `rest` module's error handling as summarised in BITRIX24.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.bitrix24.pacing import BAN_PROBE_INTERVAL
from bridge.bitrix24.upstream import error_for
from bridge.core.errors import PortalStopped, TokenError, TransientError
from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, bridge_env, bridge_in_process, until
from tests.plugins.broker import AmqpNamespace

RARELY = 3600.0


@pytest.mark.parametrize(
    ("code", "recheck"),
    [
        ("APPLICATION_NOT_FOUND", RARELY),
        ("PAYMENT_REQUIRED", RARELY),
        ("authorization_error", RARELY),
        ("user_access_error", RARELY),
        ("INVALID_CREDENTIALS", RARELY),
        ("METHOD_CONFIRM_DENIED", RARELY),
        ("METHOD_CONFIRM_WAITING", 300.0),
        ("WRONG_LICENSE", RARELY),
        ("ACCESS_DENIED", RARELY),
        ("WRONG_AUTH_TYPE", RARELY),
        ("insufficient_scope", RARELY),
        ("PORTAL_DELETED", RARELY),
        ("ERROR_ARGUMENT", RARELY),
        ("OVERLOAD_LIMIT", None),
    ],
)
def test_stopping_codes_stop_with_a_recheck(code: str, recheck: float | None) -> None:
    error = error_for(code, "why", "event.offline.get")
    assert isinstance(error, PortalStopped)
    assert error.recheck_after == recheck
    assert code in str(error)


@pytest.mark.parametrize(
    "code",
    [
        "ERROR_OAUTH",
        "CONNECTION_ERROR",
        "QUERY_LIMIT_EXCEEDED",
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
    ],
)
def test_transient_codes_are_retried(code: str) -> None:
    assert isinstance(error_for(code, "", "batch"), TransientError)


def test_an_operating_ban_is_probed_once_a_minute() -> None:
    error = error_for("OPERATION_TIME_LIMIT", "", "event.offline.get")
    assert isinstance(error, TransientError)
    assert error.retry_after == BAN_PROBE_INTERVAL


@pytest.mark.parametrize("code", ["expired_token", "invalid_token"])
def test_token_codes(code: str) -> None:
    assert isinstance(error_for(code, "", "batch"), TokenError)


@pytest.mark.parametrize(
    ("code", "stops"),
    [("APPLICATION_NOT_FOUND", True), ("PAYMENT_REQUIRED", True), ("ERROR_OAUTH", False)],
)
async def test_an_injected_code_stops_or_not_the_running_portal(
    emulated: tuple[EmulatorServer, Portal, int],
    amqp_ns: AmqpNamespace,
    tmp_path: Path,
    code: str,
    stops: bool,
) -> None:
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        count = 1000 if stops else 2
        await portal.faults(fail_with={"batch": {"error": code, "count": count}})
        await portal.generate("ONCRMLEADADD", 10)
        registry = bridge.service.metrics.registry
        if stops:

            async def stopped() -> bool:
                return session.drainer.stopped is not None

            await until(stopped, "the portal to stop", 30)
            assert code in (session.drainer.stopped or "")
            assert (
                registry.get_sample_value(
                    "bitrix24_bridge_portal_stopped", {"portal": session.portal.domain}
                )
                == 1
            )
            assert bridge.service.readiness() is None  # reported, not a reason to be unready
            (detail,) = bridge.service.portal_health()
            assert detail["state"] == "stopped"
        else:
            await collector.wait_for(10, timeout=30)
            assert session.drainer.stopped is None


async def test_a_banned_method_is_probed_once_a_minute_until_the_ban_ends(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    # LoadLimiter v2 bans a method for a fixed time; every call meanwhile is refused and the
    # refusal says nothing about when it ends. The bridge waits, probing at most once a minute.
    _server, portal, port = emulated
    collector = await amqp_ns.consume(amqp_ns.exchange("oncrmleadadd"))
    env = await bridge_env(portal, amqp_ns, tmp_path / "state.sqlite3", BRIDGE_HTTP_PORT=str(port))
    async with bridge_in_process(env) as bridge:
        session = next(iter(bridge.service.sessions.values()))
        await session.drainer.idle.wait()
        await portal.http.post(
            "/_emulator/operating", json={"method": "event.offline.get", "ban": 30}
        )
        await portal.generate("ONCRMLEADADD", 50)
        await collector.wait_for(50, timeout=120)
        stats = await portal.stats()
        assert session.drainer.stopped is None
    # One request met the ban (all its reservations refused); the probe a minute later found
    # the 30 s ban over. Hammering would show as many refused requests.
    bans = bridge.service.metrics.registry.get_sample_value(
        "bitrix24_bridge_operating_bans_total", {"method": "event.offline.get"}
    )
    assert bans == 1
    assert 1 <= stats["errors"]["OPERATION_TIME_LIMIT"] <= 25  # one batch of reservations
