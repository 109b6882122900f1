"""Keeps ``bench/`` from rotting. Not a performance test: nothing here asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import halog
from bench.__main__ import parse_args, run_all
from bench.broker import Broker
from bench.context import DEFAULT_SEED, Context
from bench.procs import metric_total
from bench.profile import summarize
from bench.report import Result, document, percentile, table, write_json
from bench.scenarios import SCENARIOS
from bench.scenarios.throttled import ceiling


def test_the_ceiling_is_the_tightest_limit_of_the_model() -> None:
    bound = ceiling(
        rate_limit=2, op_cost_per_call=0.010, op_cost_per_row=0.0003, operating_limit=420
    )
    # 0.7 s of operating time per second / 25 ms per page of 50 events.
    assert bound.events_per_s == pytest.approx(1400)
    assert bound.bound_by == "get operating time"
    assert bound.terms["request rate"] == pytest.approx(2 * 25 * 50)
    # batch: half of (get + clear) per page, plus its own call spread over 25 pages.
    assert bound.terms["batch operating time"] == pytest.approx(
        0.7 / (0.5 * (0.025 + 0.010 + 0.010 / 25)) * 50
    )

    fast_portal = ceiling(
        rate_limit=0.5, op_cost_per_call=0.010, op_cost_per_row=0.0003, operating_limit=420
    )
    assert fast_portal.bound_by == "request rate"
    assert fast_portal.events_per_s == pytest.approx(0.5 * 25 * 50)

    slower = ceiling(
        rate_limit=2,
        op_cost_per_call=0.010,
        op_cost_per_row=0.0003,
        operating_limit=420,
        processing={"event.offline.get": 0.005},
    )
    assert slower.events_per_s == pytest.approx(0.7 / 0.030 * 50)


def test_table_and_json_show_every_metric_and_verdict(tmp_path: Path) -> None:
    good = Result("drain", "drain throughput")
    good.metrics.update({"bridge_events_per_s": 1234.5, "complete": True, "terms": {"a": 1}})
    good.check("bridge / raw", 0.9, ">=", 0.85)
    good.check("p99", 30.0, "<=", 25, "ms")
    broken = Result("burst", "notification burst", error="RuntimeError: bridge exited with 2")

    text = table([good, broken])
    assert "## drain throughput" in text
    assert "1,234" in text  # thousands separated, no decimals
    assert "PASS" in text
    assert "FAIL" in text
    assert "ERROR" in text

    path = tmp_path / "bench-results.json"
    write_json(path, document([good, broken], quick=True, argv=["--quick"]))
    doc = json.loads(path.read_text())
    assert doc["quick"] is True
    checks = doc["scenarios"]["drain"]["checks"]
    assert [c["ok"] for c in checks] == [True, False]
    assert doc["scenarios"]["drain"]["metrics"]["terms"] == {"a": 1}
    assert doc["scenarios"]["burst"]["error"].startswith("RuntimeError")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7
    assert percentile([], 50) is None


def test_prometheus_samples_are_summed_over_labels() -> None:
    text = (
        "# HELP bitrix24_bridge_drain_passes_total Drain passes\n"
        'bitrix24_bridge_drain_passes_total{portal="p",outcome="ok"} 3.0\n'
        'bitrix24_bridge_drain_passes_total{portal="p",outcome="failed"} 1.0\n'
        "bitrix24_bridge_drain_passes_created 1.7e9\n"
    )
    assert metric_total(text, "bitrix24_bridge_drain_passes_total") == 4


def test_profile_summary_counts_cumulative_and_self_time() -> None:
    raw = [
        "main (/x/bridge/cli.py:1);publish (/x/site-packages/aiormq/channel.py:9) 3",
        "main (/x/bridge/cli.py:1);dumps (/usr/lib/python3.11/json/__init__.py:2) 1",
    ]
    summary = summarize(raw, top=5)
    assert "4 samples" in summary
    assert "75.0%  publish (aiormq/channel.py)" in summary
    assert "aiormq" in summary


def test_unknown_scenarios_are_refused() -> None:
    assert parse_args(["--only", "burst,e2e"]).names == ["burst", "e2e"]
    assert parse_args([]).names == list(SCENARIOS)
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])


async def test_the_burst_scenario_runs_end_to_end(tmp_path: Path) -> None:
    results = await run_all(["burst"], quick=True, workdir=tmp_path, scale=0.1)
    [result] = results
    assert result.error is None, result.error
    metrics = result.metrics
    assert metrics["notifications_per_round"] == 50
    assert metrics["bridge_non_200"] == 0
    rounds = metrics["rounds"]
    assert len(metrics["bridge_rounds_per_s"]) == len(metrics["bare_rounds_per_s"]) == rounds
    assert len(metrics["drain_passes_started"]) == rounds
    assert {c.name for c in result.checks} >= {
        "p99 response time",
        "drain passes started (most in a round)",
    }


def test_the_seed_decides_every_draw_and_a_bad_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_args([]).seed == DEFAULT_SEED
    assert parse_args(["--seed", "5"]).seed == 5

    def draws(seed: int, scenario: str = "kills") -> list[float]:
        ctx = Context(quick=True, broker=Broker(), workdir=tmp_path, seed=seed)
        rng = ctx.random(scenario)
        return [rng.random() for _ in range(4)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    assert draws(5) != draws(5, "other")
    with pytest.raises(SystemExit) as exited:
        parse_args(["--seed", "five"])
    assert exited.value.code == 2
    assert "--seed: invalid int value: 'five'" in capsys.readouterr().err


def _call(
    seq: int, at: float, member: str, replica: str | None, epoch: int | None, **kw: Any
) -> Any:
    return {
        "seq": seq,
        "time": 1000.0 + at,
        "monotonic": at,
        "member_id": member,
        "method": kw.get("method", "batch"),
        "commands": kw.get("commands", ["event.offline.get"]),
        "replica": replica,
        "epoch": None if epoch is None else str(epoch),
        "status": kw.get("status", 200),
    }


def test_the_call_log_shows_takeovers_interleaved_epochs_and_a_fenced_replica(
    tmp_path: Path,
) -> None:
    calls = [
        _call(0, 0.0, "a", "r1", 1),
        _call(1, 0.5, "b", "r1", 4),
        _call(2, 1.0, "a", "r2", 2, commands=["event.offline.list"]),  # no reservation
        _call(3, 1.5, "a", "r2", 2, status=503),  # refused: no reservation either
        _call(4, 2.0, "a", "r2", 2, method="event.offline.get", commands=None),
        _call(5, 2.5, "b", "r1", 4),  # the old owner, still calling
        _call(6, 3.0, "a", "r1", 1, method="oauth.token", commands=None),  # epoch 1 after 2
        _call(7, 3.5, "c", None, None),
    ]
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in reversed(calls)))
    loaded = halog.load(path)
    assert [c["seq"] for c in loaded] == list(range(8))  # in the order requests arrived

    found = halog.first_reservations(loaded, after=1000.2, portals=["a", "b"], not_by="r1")
    assert found == {"a": pytest.approx(1.8), "b": None}

    seen = halog.epochs(loaded)
    assert (seen.interleaved, seen.unlabelled, seen.portals, seen.epochs_seen) == (1, 1, 2, 3)
    assert "epoch 1 by r1 (oauth.token) after epoch 2" in seen.examples[0]

    assert halog.last_call(loaded, "r1") == 1003.0
    assert halog.last_call(loaded, "r1", before=1003.0) == 1002.5
    assert halog.last_call(loaded, "r9") is None
    assert halog.calls_between(loaded, "r1", 1000.5, 1003.0) == 2

    # Read as it grows: a line still being written waits for the next read.
    growing = tmp_path / "growing.jsonl"
    lines = [json.dumps(c) + "\n" for c in calls]
    growing.write_text("".join(lines[:4]) + lines[4][:10])
    tail = halog.Tail(growing)
    assert len(tail.read()) == 4
    assert not tail.taken_over(after=1000.2, portals=["a"], not_by="r1")
    growing.write_text("".join(lines))
    assert tail.taken_over(after=1000.2, portals=["a"], not_by="r1")
    assert [c["seq"] for c in tail.calls] == list(range(8))
