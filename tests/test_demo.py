"""``bitrix24-bridge demo`` as a user runs it: a child process against the real broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"^summary: generated=(?P<generated>\d+) coalesced=(?P<coalesced>\d+) "
    r"ignored=(?P<ignored>\d+) published=(?P<published>\d+) cleared=(?P<cleared>\d+) "
    r"consumed=(?P<consumed>\d+) waiting=(?P<waiting>\d+)$",
    re.MULTILINE,
)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", "demo", *args]


def _env() -> dict[str, str]:
    # The demo configures its bridge itself; a developer's BRIDGE_* must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}


def _summary(stdout: str) -> dict[str, int]:
    found = SUMMARY.findall(stdout)
    assert len(found) == 1, f"expected one summary line in:\n{stdout}"
    names = list(SUMMARY.groupindex)
    return {name: int(value) for name, value in zip(names, found[0], strict=True)}


def _assert_everything_arrived(counts: dict[str, int]) -> None:
    assert counts["generated"] > 0
    assert counts["ignored"] == 0  # the install bound every demo event before generating
    expected = counts["generated"] - counts["coalesced"]
    assert counts["published"] == expected, counts
    assert counts["cleared"] == expected, counts
    assert counts["consumed"] == expected, counts
    assert counts["waiting"] == 0, counts


def test_demo_moves_every_generated_event_to_the_subscriber(amqp_url: str) -> None:
    result = subprocess.run(
        _command("--duration", "5", "--rate", "20", "--quiet", "--amqp-url", amqp_url),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env=_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert " ERROR " not in result.stderr, result.stderr
    counts = _summary(result.stdout)
    _assert_everything_arrived(counts)
    # At 20 events/s for 5 s: the rate is honoured, give or take the last tick.
    assert 90 <= counts["generated"] <= 110, counts
    assert "installed: member_id=" in result.stdout
    status = [line for line in result.stdout.splitlines() if "in portal queue" in line]
    assert len(status) >= 3, result.stdout  # the live count, once a second
    assert "message_id=" not in result.stdout  # --quiet: no line per message


def test_demo_stops_cleanly_on_sigint_and_prints_each_message(amqp_url: str) -> None:
    proc = subprocess.Popen(
        _command("--rate", "10", "--amqp-url", amqp_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        seen: list[str] = []
        # Interrupt only once messages flow, as a user watching the screen would.
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if sum("message_id=" in s for s in seen) >= 5:
                break
        proc.send_signal(signal.SIGINT)
        # Read through the same text stream: communicate() would skip what readline() has
        # already buffered.
        rest = proc.stdout.read()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    stdout = "".join(seen) + rest
    assert proc.returncode == 0, stdout + stderr
    assert "Traceback" not in stderr
    _assert_everything_arrived(_summary(stdout))
    messages = [line for line in stdout.splitlines() if "message_id=" in line]
    assert len(messages) == _summary(stdout)["consumed"]
    line = (
        r"^  ONCRM\w+ +ID=\d+ +entity=\d+ +message_id=[0-9a-f]{32}:\d+:\S+"
        r" +routing_key=127\.0\.0\.1:\d+$"
    )
    assert re.search(line, stdout, re.MULTILINE), stdout


def test_unreachable_broker_is_one_line_and_a_failure() -> None:
    result = subprocess.run(
        _command("--amqp-url", "amqp://guest:secret@127.0.0.1:1/"),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=_env(),
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    assert result.returncode != 0
    assert len(output) == 1, output
    assert output[0].startswith("RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/")
    assert "rabbitmq-server" in output[0]
    assert "secret" not in output[0]
