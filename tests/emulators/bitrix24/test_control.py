"""The control API under /_emulator/ and the ``emulator`` command line."""

from __future__ import annotations

import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from bridge.emulators.bitrix24.cli import build_parser, config_from
from tests.plugins.emulator import PortalClient


def test_app_hands_out_a_fresh_refresh_token_each_call(
    emulator: EmulatorServer, portal: PortalClient
) -> None:
    first, second = portal.app(), portal.app()
    assert set(first) == {
        "client_id",
        "client_secret",
        "application_token",
        "member_id",
        "domain",
        "client_endpoint",
        "oauth_url",
        "refresh_token",
    }
    assert first["refresh_token"] != second["refresh_token"]
    assert first["oauth_url"] == emulator.oauth_url
    assert portal.refresh(first["refresh_token"]).status_code == 200


def test_events_answer_counts(portal: PortalClient) -> None:
    portal.bind("ONCRMLEADADD")
    events = [
        {"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": "1"}}, "user_id": 1},
        {"event": "ONCRMLEADADD", "data": {"FIELDS": {"ID": "1"}}},
        {"event": "ONCRMDEALADD", "data": {"FIELDS": {"ID": "1"}}},
    ]
    answer = portal.http.post("/_emulator/events", json={"events": events, "connector": ""})
    assert answer.json() == {"added": 1, "coalesced": 1, "ignored": 1}
    generated = portal.control("events", {"generate": {"event": "ONCRMLEADADD", "count": 10}})
    assert generated == {"added": 9, "coalesced": 1, "ignored": 0}


@pytest.mark.parametrize("body", [b"[1]", b"{", b'{"events": [{"data": 1}]}', b'{"nothing": 1}'])
def test_events_refuses_bad_bodies(portal: PortalClient, body: bytes) -> None:
    answer = portal.http.post("/_emulator/events", content=body)
    assert answer.status_code == 400
    assert "error" in answer.json()


def test_queue_detail_calls_stats_and_reset(portal: PortalClient) -> None:
    portal.bind("ONCRMLEADADD")
    portal.add("ONCRMLEADADD")
    pid = portal.result("event.offline.get", {"clear": 0})["process_id"]
    portal.call("event.offline.get", {"limit": -1})
    detail = portal.queue(detail=True)
    assert detail["reserved"] == {pid: 1}
    assert [row["PROCESS_ID"] for row in detail["rows"]] == [pid]
    calls = portal.http.get("/_emulator/calls").json()
    assert calls == {"event.bind": 1, "event.offline.get": 2}
    assert portal.stats()["errors"] == {"ERROR_ARGUMENT": 1}
    portal.control("faults", {"fail": {"app.info": 3}})

    assert portal.control("reset") == {"reset": True}
    assert portal.queue() == {"free": 0, "reserved": {}, "errors": 0}
    assert portal.http.get("/_emulator/calls").json() == {}
    assert "result" in portal.call("app.info")  # faults are gone, the token still works
    assert len(portal.result("event.get")) == 1  # bindings survive a reset


def test_clock_moves_the_portals_time(portal: PortalClient) -> None:
    before = portal.call("app.info")["time"]["start"]
    assert portal.control("clock", {"advance": 7200})["now"] >= before + 7200
    assert portal.call("app.info")["error"] == "expired_token"


def test_faults_refuse_garbage(portal: PortalClient) -> None:
    answer = portal.http.post("/_emulator/faults", json={"fail": {"app.info": "many"}})
    assert answer.status_code == 400


def test_command_line_options() -> None:
    args = build_parser().parse_args(
        [
            "--port",
            "0",
            "--handler",
            "http://127.0.0.1:9/hook",
            "--min-timeout",
            "3",
            "--rate-limit",
            "0",
            "--rate-burst",
            "250",
            "--token-ttl",
            "60",
            "--op-cost-per-row",
            "0.0003",
            "--client-id",
            "local.x",
            "--operating-limit",
            "480",
            "--cleanup-interval",
            "60",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ]
    )
    config = config_from(args)
    assert config.handler_url == "http://127.0.0.1:9/hook"
    assert (config.min_timeout, config.rate_limit, config.rate_burst) == (3, None, 250)
    assert (config.token_ttl, config.op_cost_per_row, config.client_id) == (60, 0.0003, "local.x")
    assert (config.operating_limit, config.cleanup_interval) == (480, 60)
    assert (config.tls_certfile, config.tls_keyfile, config.scheme) == (
        "cert.pem",
        "key.pem",
        "https",
    )
    defaults = config_from(build_parser().parse_args([]))
    assert (defaults.operating_limit, defaults.scheme) == (420, "http")
    # The former spelling still works.
    assert (
        config_from(build_parser().parse_args(["--operating-budget", "300"])).operating_limit == 300
    )


def test_command_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    every_option = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    assert every_option <= set(shown.replace(",", " ").split())
    assert "300 s" in shown  # the ban is explained where the limit is


def test_stats_show_operating_time_bans_and_cleanups(portal: PortalClient) -> None:
    portal.control("operating", {"method": "event.offline.get", "seconds": 12.5})
    portal.control("operating", {"method": "batch", "ban": 60})
    stats = portal.stats()
    assert stats["operating"]["event.offline.get"] == 12.5
    assert stats["operating_limit"] == 420
    assert stats["bans"] == {"batch": pytest.approx(stats["now"] + 60)}
    assert stats["cleaned"] == 0
    assert portal.call("batch", {"cmd": ["app.info"]})["error"] == "OPERATION_TIME_LIMIT"


def test_a_bad_install_body_is_refused(portal: PortalClient) -> None:
    answer = portal.http.post("/_emulator/install", json={"url": "http://x.y/", "user_id": "me"})
    assert answer.status_code == 400
