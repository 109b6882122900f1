"""The chart's alert rules, unit-tested with ``promtool test rules``.

The cases live in ``tests/alerts/*.test.yaml`` (promtool's own format); the rules are rendered
from the chart with everything on, as an operator would deploy them. promtool comes from
Debian's ``prometheus`` package (``scripts/setup.sh`` puts it in ``.venv/bin``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "alerts").glob("*.test.yaml"))
# Everything that renders an alert: the rule itself, the Diadoc source and scaled mode.
VALUES = {
    "metrics": {"prometheusRule": {"enabled": True}},
    "secrets": {"stateUrl": "postgresql://bridge:secret@db:5432/bridge"},
    "diadoc": {"enabled": True, "boxes": ["b1@diadoc.ru"], "clientId": "cid"},
}


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))
    if Path(found).exists():
        return found
    message = "promtool not installed (scripts/setup.sh installs it)"
    if os.environ.get("BRIDGE_TEST_REQUIRE_BROKER") == "1":
        pytest.fail(message + "; required in CI", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def rule_groups() -> dict[str, Any]:
    with helm.Chart.load(ROOT / "helm") as chart:
        rendered = chart.render(VALUES, name="rel", namespace="bridge", is_install=True)
    (text,) = [t for path, t in rendered.items() if path.endswith("prometheusrule.yaml")]
    spec: dict[str, Any] = yaml.safe_load(text)["spec"]
    return spec


def alerts_in(groups: dict[str, Any]) -> set[str]:
    return {rule["alert"] for group in groups["groups"] for rule in group["rules"]}


def cases_in(path: Path) -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(path.read_text())["tests"]
    return tests


def test_there_are_cases() -> None:
    assert CASES, "no tests/alerts/*.test.yaml"


@pytest.mark.parametrize("case_file", CASES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(
    case_file: Path, rule_groups: dict[str, Any], tmp_path: Path
) -> None:
    binary = promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups))
    shutil.copy(case_file, tmp_path / case_file.name)
    # The rules as Prometheus would load them, then the cases.
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", case_file.name]):
        result = subprocess.run(
            [binary, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_where_it_fires(rule_groups: dict[str, Any]) -> None:
    # An alert added to the chart later needs its own promtool case before this passes.
    fires: set[str] = set()
    named: set[str] = set()
    for path in CASES:
        for case in cases_in(path):
            for check in case.get("alert_rule_test", []):
                named.add(check["alertname"])
                if check.get("exp_alerts"):
                    fires.add(check["alertname"])
    alerts = alerts_in(rule_groups)
    assert alerts - fires == set(), f"alerts without a firing case: {sorted(alerts - fires)}"
    assert named - alerts == set(), f"cases for alerts that do not exist: {sorted(named - alerts)}"


def test_the_absent_alert_exists(rule_groups: dict[str, Any]) -> None:
    # Nothing the bridge exports can say that it is down: the rule must look at `up` itself.
    (down,) = [
        rule
        for group in rule_groups["groups"]
        for rule in group["rules"]
        if rule["alert"] == "Bitrix24BridgeDown"
    ]
    assert down["expr"].startswith("absent(up{")
    assert 'namespace="bridge"' in down["expr"]
