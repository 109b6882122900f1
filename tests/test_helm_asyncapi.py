"""The chart's AsyncAPI ConfigMap (helm/templates/asyncapi.yaml): it publishes the document
``bitrix24-bridge asyncapi`` printed, and refuses one that no longer matches the configuration."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from bridge.asyncapi import build, load_diadoc_layout, render
from bridge.settings import load_settings
from tests.test_helm import (
    CHART_DIR,
    FULL_VALUES,
    KUBE_VERSIONS,
    NAMESPACE,
    Manifests,
    env_config,
    secret_refs,
)
from tests.test_helm import render as render_chart


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture
def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text())
    return values


def pod_env(objects: Manifests) -> dict[str, str]:
    """The bridge's environment in the pod: the ConfigMap, and the Secret's variables (their
    values are not in the chart when an existing Secret holds them: stand-ins here)."""
    stand_ins = {name: "stand-in" for name in secret_refs(objects)}
    stand_ins["BRIDGE_AMQP_URL"] = "amqp://bridge:pw@rabbitmq:5672/crm"
    stand_ins.pop("BRIDGE_STATE_KEY", None)  # a stand-in is no Fernet key; the document needs none
    return {**env_config(objects), **stand_ins}


def document_for(
    chart: helm.Chart, values: dict[str, Any], fmt: Literal["yaml", "json"] = "yaml"
) -> str:
    """What `bitrix24-bridge asyncapi` prints in the pod this release runs."""
    env = pod_env(render_chart(chart, values))
    return render(build(load_settings(env), load_diadoc_layout(env)), fmt)


def with_document(values: dict[str, Any], document: str) -> dict[str, Any]:
    return {**values, "asyncapi": {"enabled": True, "document": document}}


def test_off_by_default(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    for values in (None, full_values):
        names = {name for kind, name in render_chart(chart, values) if kind == "ConfigMap"}
        assert not any(name.endswith("-asyncapi") for name in names)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_publishes_the_document_the_bridge_prints(
    chart: helm.Chart, full_values: dict[str, Any], fmt: Literal["yaml", "json"]
) -> None:
    document = document_for(chart, full_values, fmt)
    values = with_document(full_values, document)
    objects = render_chart(chart, values)
    configmap = objects[("ConfigMap", "b24-bridge-asyncapi")]
    assert yaml.safe_load(configmap["data"]["asyncapi.yaml"]) == yaml.safe_load(document)
    assert configmap["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(configmap, version, strict=True)
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_default_values_document_renders_too(chart: helm.Chart) -> None:
    values: dict[str, Any] = {"config": {"events": ["ONCRMLEADADD"]}}
    objects = render_chart(chart, with_document(values, document_for(chart, values)))
    assert ("ConfigMap", "rel-bitrix24-bridge-asyncapi") in objects


def _changes() -> list[tuple[str, Any]]:
    return [
        ("an event added", lambda v: v["config"]["events"].append("ONCRMLEADDELETE")),
        ("an event removed", lambda v: v["config"]["events"].pop()),
        ("another exchange template", lambda v: v["config"].update(exchangeTemplate="x.{event}")),
        ("another routing key", lambda v: v["config"].update(routingKeyTemplate="{member_id}")),
        ("another unrouted exchange", lambda v: v["config"].update(unroutedExchange="x.unrouted")),
        ("Diadoc turned off", lambda v: v["diadoc"].update(enabled=False)),
        ("another Diadoc exchange", lambda v: v["diadoc"].update(exchange="x.diadoc")),
        ("events overridden in extraEnv", lambda v: v["config"]["extraEnv"].update(
            BRIDGE_EVENTS="ONCRMLEADADD")),
    ]  # fmt: skip


@pytest.mark.parametrize(("what", "change"), _changes(), ids=[w for w, _ in _changes()])
def test_a_stale_document_fails_the_render(
    chart: helm.Chart,
    full_values: dict[str, Any],
    what: str,
    change: Callable[[dict[str, Any]], object],
) -> None:
    document = document_for(chart, full_values)
    changed = copy.deepcopy(full_values)
    change(changed)
    with pytest.raises(helm.HelmRenderError, match=r"asyncapi\.document is stale"):
        render_chart(chart, with_document(changed, document))
    # The same change with a regenerated document renders.
    render_chart(chart, with_document(changed, document_for(chart, changed)))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("", "asyncapi.enabled needs asyncapi.document"),
        ("not: [valid", "not an AsyncAPI 3.0.0 document"),
        ("asyncapi: 2.6.0\nchannels: {}\n", "not an AsyncAPI 3.0.0 document"),
    ],
)
def test_a_missing_or_foreign_document_fails_the_render(
    chart: helm.Chart, document: str, message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render_chart(chart, with_document({}, document))


def test_schema_refuses_unknown_keys(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_chart(chart, {"asyncapi": {"enabled": True, "file": "asyncapi.yaml"}})
