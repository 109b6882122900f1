"""The Helm chart, rendered and linted offline with Helm's own engine (helm-python-sdk).

Every rendered object is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate); the Prometheus Operator kinds, which it has no schemas for, are checked
by hand.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client.metrics_core import Metric

from bridge.diadoc.metrics import diadoc_metrics
from bridge.diadoc.settings import load_diadoc_settings
from bridge.metrics import Metrics

CHART_DIR = Path(__file__).resolve().parent.parent / "helm"
FULL_VALUES = CHART_DIR / "ci" / "full-values.yaml"
SCALED_VALUES = CHART_DIR / "ci" / "scaled-values.yaml"
RELEASE = "rel"
NAMESPACE = "bridge"
FULLNAME = "rel-bitrix24-bridge"

# The oldest Kubernetes the chart supports that the pinned kubernetes-validate knows, and the
# newest it knows: an API removed upstream would fail the second.
KUBE_VERSIONS = ("1.30.0", latest_version())

# Every metric the bridge exposes, as the issue lists them.
KNOWN_METRICS = {
    "bitrix24_bridge_events_published_total",
    "bitrix24_bridge_events_cleared_total",
    "bitrix24_bridge_publish_failures_total",
    "bitrix24_bridge_rest_calls_total",
    "bitrix24_bridge_drain_passes_total",
    "bitrix24_bridge_drain_pass_duration_seconds",
    "bitrix24_bridge_events_per_request",
    "bitrix24_bridge_inflight_reservations",
    "bitrix24_bridge_upstream_queue_depth",
    "bitrix24_bridge_oldest_pending_event_timestamp_seconds",
    "bitrix24_bridge_token_refreshes_total",
    "bitrix24_bridge_notifications_total",
    "bitrix24_bridge_broker_connected",
    "bitrix24_bridge_portal_stopped",
    "bitrix24_bridge_binding_failed",
    "bitrix24_bridge_events_parked_total",
    "bitrix24_bridge_operating_bans_total",
}
# Scaled mode's (BRIDGE_STATE_URL): registered always, not on the dashboard yet.
SCALED_METRICS = {
    "bitrix24_bridge_shards_held",
    "bitrix24_bridge_lease_renew_failures_total",
}
# The Diadoc source's metrics (bridge/diadoc/metrics.py), registered only while it is on.
DIADOC_METRICS = {
    "bitrix24_bridge_diadoc_events_published_total",
    "bitrix24_bridge_diadoc_late_events_total",
    "bitrix24_bridge_diadoc_duplicates_skipped_total",
    "bitrix24_bridge_diadoc_requests_total",
    "bitrix24_bridge_diadoc_token_refreshes_total",
    "bitrix24_bridge_diadoc_lag_seconds",
    "bitrix24_bridge_diadoc_malformed_events_total",
    "bitrix24_bridge_diadoc_tie_overflows_total",
    "bitrix24_bridge_diadoc_api_deprecation_notices_total",
    "bitrix24_bridge_diadoc_api_sunset_timestamp_seconds",
    "bitrix24_bridge_diadoc_caught_up_timestamp_seconds",
    "bitrix24_bridge_diadoc_last_answer_timestamp_seconds",
    "bitrix24_bridge_diadoc_last_event_timestamp_seconds",
}
HISTOGRAMS = {
    "bitrix24_bridge_drain_pass_duration_seconds",
    "bitrix24_bridge_events_per_request",
}
METRIC_RE = re.compile(r"\bbitrix24_bridge_[a-z0-9_]+")

SECRET_VARS = {
    "BRIDGE_CLIENT_SECRET",
    "BRIDGE_REFRESH_TOKEN",
    "BRIDGE_APPLICATION_TOKEN",
    "BRIDGE_AMQP_URL",
    "BRIDGE_STATE_KEY",
}
DIADOC_SECRET_VARS = {"BRIDGE_DIADOC_CLIENT_SECRET", "BRIDGE_DIADOC_REFRESH_TOKEN"}
DIADOC_SECRETS = {
    "diadocClientSecret": "diadoc-s3cr3t",
    "diadocRefreshToken": "diadoc-refresh-0123",
}
DIADOC_ON = {"enabled": True, "boxes": ["box-1@diadoc.ru", "box-2@diadoc.ru"], "clientId": "cid"}
SECRETS = {
    "clientSecret": "s3cr3t-client",
    "amqpUrl": "amqp://bridge:pa55word@rabbitmq:5672/crm",
    "refreshToken": "refresh-0123456789",
    "applicationToken": "apptoken-abcdef",
    "stateKey": "c2VjcmV0LWtleS1mb3ItdGVzdHMtMzItYnl0ZXMhISE=",
}


Manifests = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text())
    return values


def render_raw(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Manifests:
    """Rendered objects by (kind, name); NOTES.txt and empty documents left out."""
    objects: Manifests = {}
    for path, text in render_raw(chart, values).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} rendered twice"
                objects[key] = doc
    return objects


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    rendered = render_raw(chart, values)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def one(objects: Manifests, kind: str) -> dict[str, Any]:
    found = [doc for (k, _), doc in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: Manifests) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_config(objects: Manifests) -> dict[str, str]:
    """Data of the ConfigMap the container takes its environment from."""
    (source,) = container(objects)["envFrom"]
    data: dict[str, str] = objects[("ConfigMap", source["configMapRef"]["name"])]["data"]
    return data


def secret_refs(objects: Manifests) -> dict[str, dict[str, Any]]:
    """Env variable -> its secretKeyRef."""
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container(objects).get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


@pytest.fixture(scope="module")
def scaled_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(SCALED_VALUES.read_text())
    return values


@pytest.fixture(params=["default", "full", "scaled"])
def values(
    request: pytest.FixtureRequest, full_values: dict[str, Any], scaled_values: dict[str, Any]
) -> dict[str, Any] | None:
    """The chart's defaults, then ci/full-values.yaml, then ci/scaled-values.yaml."""
    return {"default": None, "full": full_values, "scaled": scaled_values}[request.param]


# --- lint and schema validation -------------------------------------------------------------


def test_lint_is_clean_in_strict_mode(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(
    chart: helm.Chart, values: dict[str, Any] | None, kube_version: str
) -> None:
    objects = render(chart, values)
    assert objects
    for (kind, name), doc in objects.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema in kubernetes-validate; checked in the tests below
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} is invalid for Kubernetes {kube_version}: {exc.message}")


def test_default_values_leave_the_optional_objects_out(chart: helm.Chart) -> None:
    kinds = {kind for kind, _ in render(chart)}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    }


def test_full_values_render_every_object(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    kinds = sorted(kind for kind, _ in render(chart, full_values))
    # The chart's Secret is replaced by existingSecret; the second ConfigMap is the dashboard.
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Ingress",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "two"},
        {"replicaCount": 2},
        {"persistence": {"size": 5}},
        {"config": {"pageSize": "50"}},
        {"config": {"pageSize": 5000}},
        {"config": {"logLevel": "VERBOSE"}},
        {"config": {"events": "ONCRMLEADADD"}},
        {"config": {"publicUrl": "bridge.example.com"}},
        {"config": {"extraEnv": {"BRIDGE_CLIENT_SECRET": "leaked"}}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"ingress": {"paths": [{"path": "/bitrix24/events", "pathType": "Regex"}]}},
        {"terminationGracePeriodSeconds": 5},
        {"replicas": 1},
        {"diadoc": {"boxes": "abc"}},
        {"diadoc": {"enabled": "yes"}},
        {"diadoc": {"boxes": ["two words"]}},
        {"diadoc": {"pollInterval": "30"}},
        {"diadoc": {"pageLimit": 500}},
        {"diadoc": {"apiUrl": "diadoc-api.kontur.ru"}},
        {"diadoc": {"unknown": 1}},
        {"secrets": {"diadocClientSecret": 42}},
        {"config": {"extraEnv": {"BRIDGE_DIADOC_CLIENT_SECRET": "leaked"}}},
        {"config": {"extraEnv": {"BRIDGE_STATE_URL": "postgresql://u:leaked@pg/db"}}},
        {"config": {"shards": 0}},
        {"config": {"leaseTtl": 0}},
        {"stateUrlSecret": {"name": "pg-app", "key": ""}},
        # No autoscaler: a HorizontalPodAutoscaler would need the same state-URL rule.
        {"autoscaling": {"enabled": True}},
    ],
    ids=lambda bad: json.dumps(bad, sort_keys=True),
)
def test_schema_refuses_wrong_values(chart: helm.Chart, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_raw(chart, bad)


def test_full_values_pass_the_schema(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    chart.validate_schema(chart.merge_values(full_values))


# --- the Deployment -----------------------------------------------------------------------


def test_pod_runs_non_root_with_a_read_only_root(chart: helm.Chart) -> None:
    objects = render(chart)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    ctx = container(objects)["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False


def test_one_replica_replaced_not_rolled(chart: helm.Chart) -> None:
    deployment = one(render(chart), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_probes_hit_livez_and_readyz(chart: helm.Chart) -> None:
    c = container(render(chart))
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The startup probe must cover a slow start before liveness may kill the pod.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_memory_is_limited_and_shutdown_has_time(chart: helm.Chart) -> None:
    objects = render(chart)
    resources = container(objects)["resources"]
    assert resources["limits"]["memory"] == "256Mi"
    # Measured 63-85 MiB while draining: the request covers it.
    assert resources["requests"] == {"cpu": "50m", "memory": "128Mi"}
    # The bridge finishes the in-flight page within ~20 s of SIGTERM.
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 20 < grace <= 60


def test_state_volume_is_a_claim_mounted_at_the_state_directory(chart: helm.Chart) -> None:
    objects = render(chart)
    c = container(objects)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"state": "/var/lib/bitrix24-bridge", "tmp": "/tmp"}
    config = env_config(objects)
    assert config["BRIDGE_STATE_PATH"] == "/var/lib/bitrix24-bridge/state.sqlite3"
    volumes = {
        v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    pvc = objects[("PersistentVolumeClaim", claim)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "emptyDir" in volumes["tmp"]


def test_state_volume_without_persistence_or_from_an_existing_claim(chart: helm.Chart) -> None:
    ephemeral = render(chart, {"persistence": {"enabled": False}})
    volumes = one(ephemeral, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "state") == {"name": "state", "emptyDir": {}}
    assert not [k for k, _ in ephemeral if k == "PersistentVolumeClaim"]
    assert "persistence is disabled" in notes(chart, {"persistence": {"enabled": False}})

    existing = render(chart, {"persistence": {"existingClaim": "bridge-state"}})
    volumes = one(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    state = next(v for v in volumes if v["name"] == "state")
    assert state["persistentVolumeClaim"] == {"claimName": "bridge-state"}
    assert not [k for k, _ in existing if k == "PersistentVolumeClaim"]


def test_image_defaults_to_the_app_version(chart: helm.Chart) -> None:
    appversion = chart.metadata["appVersion"]
    assert container(render(chart))["image"] == f"bitrix24-bridge:{appversion}"
    digest = "sha256:" + "a" * 64
    pinned = render(chart, {"image": {"repository": "r.example/b", "digest": digest}})
    assert container(pinned)["image"] == f"r.example/b@{digest}"


# --- configuration and secrets --------------------------------------------------------------


def test_secret_variables_come_from_the_charts_secret(chart: helm.Chart) -> None:
    objects = render(chart, {"secrets": SECRETS})
    refs = secret_refs(objects)
    assert set(refs) == SECRET_VARS
    for var, ref in refs.items():
        assert ref["name"] == FULLNAME
        assert ref["key"] == var
    secret = objects[("Secret", FULLNAME)]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "BRIDGE_CLIENT_SECRET": SECRETS["clientSecret"],
        "BRIDGE_AMQP_URL": SECRETS["amqpUrl"],
        "BRIDGE_REFRESH_TOKEN": SECRETS["refreshToken"],
        "BRIDGE_APPLICATION_TOKEN": SECRETS["applicationToken"],
        "BRIDGE_STATE_KEY": SECRETS["stateKey"],
    }
    config = env_config(objects)
    assert not SECRET_VARS & set(config)
    rendered_config = json.dumps(config)
    for value in SECRETS.values():
        assert value not in rendered_config


def test_empty_secret_values_are_left_out(chart: helm.Chart) -> None:
    objects = render(chart, {"secrets": {"clientSecret": "only-this"}})
    assert set(secret_refs(objects)) == {"BRIDGE_CLIENT_SECRET"}
    assert set(objects[("Secret", FULLNAME)]["data"]) == {"BRIDGE_CLIENT_SECRET"}
    # A release without any secret still renders, and says what is missing.
    assert "no client secret is configured" in notes(chart)


def test_existing_secret_with_custom_keys(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    objects = render(chart, {**full_values, "secrets": SECRETS})
    assert not [kind for kind, _ in objects if kind == "Secret"]
    refs = secret_refs(objects)
    assert {var: ref["key"] for var, ref in refs.items()} == {
        "BRIDGE_CLIENT_SECRET": "client-secret",
        "BRIDGE_AMQP_URL": "amqp-url",
        "BRIDGE_REFRESH_TOKEN": "refresh-token",
        "BRIDGE_APPLICATION_TOKEN": "application-token",
        "BRIDGE_STATE_KEY": "state-key",
        # Diadoc is on in the full values.
        "BRIDGE_DIADOC_CLIENT_SECRET": "diadoc-client-secret",
        "BRIDGE_DIADOC_REFRESH_TOKEN": "diadoc-refresh-token",
    }
    assert {ref["name"] for ref in refs.values()} == {"bitrix24-credentials"}
    # The pod cannot run without these two; the bootstrap and key material may be absent.
    assert {var for var, ref in refs.items() if not ref.get("optional")} == {
        "BRIDGE_CLIENT_SECRET",
        "BRIDGE_AMQP_URL",
    }
    config = env_config(objects)
    assert not SECRET_VARS & set(config)
    for value in SECRETS.values():
        assert value not in json.dumps(config)


def test_client_id_may_live_in_the_secret_but_not_in_both_places(chart: helm.Chart) -> None:
    in_secret = render(chart, {"secrets": {"clientId": "app.1"}})
    assert secret_refs(in_secret)["BRIDGE_CLIENT_ID"]["key"] == "BRIDGE_CLIENT_ID"
    assert "BRIDGE_CLIENT_ID" not in env_config(in_secret)
    with pytest.raises(helm.HelmRenderError, match="BRIDGE_CLIENT_ID"):
        render_raw(chart, {"config": {"clientId": "app.1"}, "secrets": {"clientId": "app.1"}})


def test_config_map_holds_the_structured_settings(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    data = env_config(render(chart, full_values))
    assert data["BRIDGE_EVENTS"] == "ONCRMLEADADD,ONCRMDEALUPDATE"
    assert data["BRIDGE_ALLOWED_DOMAINS"] == "acme.bitrix24.ru,acme-test.bitrix24.ru"
    assert data["BRIDGE_PAGE_SIZE"] == "50"
    assert data["BRIDGE_RATE_LIMIT"] == "5"
    assert data["BRIDGE_DECLARE"] == "false"
    assert data["BRIDGE_CLIENT_ID"] == "local.6650f7b3a1c2d4.12345678"
    assert data["BRIDGE_PUBLIC_URL"] == "https://b24-bridge.example.com"
    assert data["BRIDGE_HTTP_PORT"] == "8080"
    assert data["TZ"] == "UTC"
    assert all(isinstance(v, str) for v in data.values())

    defaults = env_config(render(chart))
    # Unset optional settings stay unset, so the bridge's own defaults apply.
    assert not {"BRIDGE_PUBLIC_URL", "BRIDGE_PORTAL_URL", "BRIDGE_OAUTH_URL"} & set(defaults)
    override = render(chart, {"config": {"extraEnv": {"BRIDGE_PAGE_SIZE": "10"}}})
    assert env_config(override)["BRIDGE_PAGE_SIZE"] == "10"


def test_changed_config_or_secret_restarts_the_pod(chart: helm.Chart) -> None:
    def checksums(values: dict[str, Any] | None) -> dict[str, str]:
        annotations = one(render(chart, values), "Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums(None)
    assert set(base) == {"checksum/config", "checksum/secret"}
    config_changed = checksums({"config": {"pageSize": 10}})
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secret"] == base["checksum/secret"]
    secret_changed = checksums({"secrets": {"clientSecret": "rotated"}})
    assert secret_changed["checksum/secret"] != base["checksum/secret"]


# --- Diadoc ------------------------------------------------------------------------------


def diadoc_vars(objects: Manifests) -> set[str]:
    """Every BRIDGE_DIADOC_* variable the pod gets, from the ConfigMap or the Secret."""
    names = set(env_config(objects)) | {env["name"] for env in container(objects).get("env", [])}
    return {name for name in names if name.startswith("BRIDGE_DIADOC_")}


def test_diadoc_is_off_by_default_and_renders_no_variable(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    assert diadoc_vars(render(chart)) == set()
    # Credentials and settings given while the source is off still render nothing, in the chart's
    # Secret or from an existing one.
    given = {"secrets": DIADOC_SECRETS, "diadoc": {**DIADOC_ON, "enabled": False}}
    objects = render(chart, given)
    assert diadoc_vars(objects) == set()
    assert not DIADOC_SECRET_VARS & set(objects[("Secret", FULLNAME)]["data"])
    off = render(chart, {**full_values, "diadoc": {"enabled": False}})
    assert diadoc_vars(off) == set()
    assert "Diadoc" not in notes(chart)


def test_diadoc_on_renders_the_plain_settings_into_the_config_map(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    data = env_config(render(chart, full_values))
    diadoc = {k: v for k, v in data.items() if k.startswith("BRIDGE_DIADOC_")}
    assert diadoc == {
        "BRIDGE_DIADOC_BOXES": (
            "7d1a2a5f-3c1b-4f1e-9f5e-0a1b2c3d4e5f@diadoc.ru,"
            "0b9e8d7c-6a5b-4c3d-2e1f-a0b1c2d3e4f5@diadoc.ru"
        ),
        "BRIDGE_DIADOC_API_URL": "https://diadoc-api.kontur.ru",
        "BRIDGE_DIADOC_TOKEN_URL": "https://identity.kontur.ru/connect/token",
        "BRIDGE_DIADOC_CLIENT_ID": "crm-sync-diadoc",
        "BRIDGE_DIADOC_POLL_INTERVAL": "15",
        "BRIDGE_DIADOC_RESCAN_WINDOW": "7200",
        "BRIDGE_DIADOC_RESCAN_INTERVAL": "600",
        "BRIDGE_DIADOC_START_LOOKBACK": "86400",
        "BRIDGE_DIADOC_PAGE_LIMIT": "50",
        "BRIDGE_DIADOC_SEEN_KEEP": "200000",
        "BRIDGE_DIADOC_POPULATE_DOCUMENTS": "false",
        "BRIDGE_DIADOC_EXCHANGE": "crm.diadoc",
        "BRIDGE_DIADOC_REQUEST_TIMEOUT": "20.5",
    }
    # Secrets never land in the ConfigMap.
    assert not DIADOC_SECRET_VARS & set(data)

    # The bridge accepts what the chart renders, and reads the same values back.
    settings = load_diadoc_settings({**diadoc, "BRIDGE_DIADOC_CLIENT_SECRET": "x"})
    assert settings.enabled
    assert settings.boxes == tuple(full_values["diadoc"]["boxes"])
    assert settings.page_limit == 50
    assert settings.seen_keep == 200_000
    assert settings.request_timeout == 20.5
    assert settings.populate_documents is False
    assert settings.exchange == "crm.diadoc"


def test_diadoc_unset_keys_leave_the_bridge_defaults(chart: helm.Chart) -> None:
    data = env_config(render(chart, {"diadoc": DIADOC_ON}))
    diadoc = {k: v for k, v in data.items() if k.startswith("BRIDGE_DIADOC_")}
    assert diadoc == {
        "BRIDGE_DIADOC_BOXES": "box-1@diadoc.ru,box-2@diadoc.ru",
        "BRIDGE_DIADOC_CLIENT_ID": "cid",
    }
    # 0 is a value, not "unset": rescanWindow 0 turns the re-scan off.
    zero = render(chart, {"diadoc": {**DIADOC_ON, "rescanWindow": 0, "startLookback": 0}})
    assert env_config(zero)["BRIDGE_DIADOC_RESCAN_WINDOW"] == "0"
    assert env_config(zero)["BRIDGE_DIADOC_START_LOOKBACK"] == "0"
    # Large whole numbers are not printed in exponent form, which an int field would refuse.
    big = render(chart, {"diadoc": {**DIADOC_ON, "seenKeep": 5_000_000, "pollInterval": 0.5}})
    assert env_config(big)["BRIDGE_DIADOC_SEEN_KEEP"] == "5000000"
    assert env_config(big)["BRIDGE_DIADOC_POLL_INTERVAL"] == "0.5"


def test_diadoc_api_version_and_department_reach_the_bridge(chart: helm.Chart) -> None:
    one_box = {**DIADOC_ON, "boxes": ["box-1@diadoc.ru"]}
    data = env_config(
        render(chart, {"diadoc": {**one_box, "apiVersion": "V4", "departmentId": "d-1"}})
    )
    assert data["BRIDGE_DIADOC_API_VERSION"] == "V4"
    assert data["BRIDGE_DIADOC_DEPARTMENT_ID"] == "d-1"
    # The bridge accepts what the chart renders.
    from bridge.diadoc.settings import load_diadoc_settings

    rendered = {k: v for k, v in data.items() if k.startswith("BRIDGE_DIADOC_")}
    settings = load_diadoc_settings({**rendered, "BRIDGE_DIADOC_CLIENT_SECRET": "s"})
    assert settings.api_version == "V4"
    assert settings.department_id == "d-1"
    with pytest.raises(Exception, match="apiVersion"):
        render(chart, {"diadoc": {**one_box, "apiVersion": "V2"}})  # V2 lacks FullVersion


def test_diadoc_secrets_come_from_the_charts_secret(chart: helm.Chart) -> None:
    objects = render(chart, {"diadoc": DIADOC_ON, "secrets": {**SECRETS, **DIADOC_SECRETS}})
    refs = secret_refs(objects)
    assert set(refs) == SECRET_VARS | DIADOC_SECRET_VARS
    for var in DIADOC_SECRET_VARS:
        assert refs[var]["name"] == FULLNAME
        assert refs[var]["key"] == var
        assert refs[var]["optional"] is True
    secret = objects[("Secret", FULLNAME)]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded["BRIDGE_DIADOC_CLIENT_SECRET"] == DIADOC_SECRETS["diadocClientSecret"]
    assert decoded["BRIDGE_DIADOC_REFRESH_TOKEN"] == DIADOC_SECRETS["diadocRefreshToken"]
    rendered_config = json.dumps(env_config(objects))
    for value in DIADOC_SECRETS.values():
        assert value not in rendered_config
    # An empty value is left out, as for the Bitrix24 secrets.
    only_secret = render(chart, {"diadoc": DIADOC_ON, "secrets": {"diadocClientSecret": "x"}})
    assert diadoc_vars(only_secret) & DIADOC_SECRET_VARS == {"BRIDGE_DIADOC_CLIENT_SECRET"}


def test_diadoc_secrets_come_from_the_existing_secret(chart: helm.Chart) -> None:
    values = {"diadoc": DIADOC_ON, "existingSecret": "creds"}
    refs = secret_refs(render(chart, values))
    diadoc = {var: ref for var, ref in refs.items() if var in DIADOC_SECRET_VARS}
    # The default key names; optional, so the pod starts without them (the bridge then says
    # what is missing).
    assert diadoc == {
        "BRIDGE_DIADOC_CLIENT_SECRET": {
            "name": "creds",
            "key": "BRIDGE_DIADOC_CLIENT_SECRET",
            "optional": True,
        },
        "BRIDGE_DIADOC_REFRESH_TOKEN": {
            "name": "creds",
            "key": "BRIDGE_DIADOC_REFRESH_TOKEN",
            "optional": True,
        },
    }
    custom = {
        **values,
        "existingSecretKeys": {"diadocClientSecret": "dd-secret", "diadocRefreshToken": ""},
    }
    refs = secret_refs(render(chart, custom))
    assert refs["BRIDGE_DIADOC_CLIENT_SECRET"]["key"] == "dd-secret"
    # An empty key name leaves the variable out.
    assert "BRIDGE_DIADOC_REFRESH_TOKEN" not in refs


def test_diadoc_enabled_without_boxes_fails_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"diadoc\.boxes is empty"):
        render_raw(chart, {"diadoc": {"enabled": True}})
    with pytest.raises(helm.HelmRenderError, match=r"diadoc\.boxes is empty"):
        render_raw(chart, {"diadoc": {**DIADOC_ON, "boxes": []}})


def test_notes_name_the_diadoc_boxes(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    text = notes(chart, full_values)
    boxes = ", ".join(full_values["diadoc"]["boxes"])
    assert f"Diadoc is on: polling 2 box(es): {boxes}." in text
    # Missing Diadoc credentials are named, like the Bitrix24 ones.
    bare = notes(chart, {"diadoc": {"enabled": True, "boxes": ["b@diadoc.ru"]}})
    assert "diadoc.clientId is empty" in bare
    assert "no Diadoc client secret is configured" in bare


# --- exposure -------------------------------------------------------------------------------


def test_service_and_ingress_publish_only_the_handler(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    objects = render(chart, full_values)
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    # Readiness no longer waits for a portal, so not-ready addresses stay unpublished.
    assert service["spec"]["publishNotReadyAddresses"] is False
    ingress = one(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/bitrix24/events"]
    assert ingress["spec"]["rules"][0]["host"] == "b24-bridge.example.com"
    assert ingress["spec"]["tls"][0]["secretName"] == "b24-bridge-tls"


def test_pdb_never_blocks_a_node_drain(chart: helm.Chart) -> None:
    pdb = one(render(chart), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]


def test_network_policy_admits_the_handler_and_needed_egress(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    policy = one(render(chart, full_values), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert len(policy["ingress"][0]["from"]) == 2
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (5671, "TCP"), (443, "TCP")} <= egress_ports


def test_every_object_carries_the_standard_labels(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    for (kind, name), doc in render(chart, full_values).items():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "bitrix24-bridge", (kind, name)
        assert labels["app.kubernetes.io/instance"] == RELEASE, (kind, name)
        assert labels["app.kubernetes.io/managed-by"] == "Helm", (kind, name)
        assert labels["app.kubernetes.io/version"] == chart.metadata["appVersion"], (kind, name)
        assert labels["helm.sh/chart"] == f"bitrix24-bridge-{chart.version}", (kind, name)


def test_notes_name_the_handler_url_and_the_readiness_check(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    text = notes(chart, full_values)
    assert "https://b24-bridge.example.com/bitrix24/events" in text
    assert "/readyz" in text
    assert "WARNING" not in text
    derived = notes(chart, {"ingress": {"enabled": True, "hosts": ["hook.example.org"]}})
    assert "https://hook.example.org/bitrix24/events" in derived
    assert "<public URL of the bridge>/bitrix24/events" in notes(chart)


# --- monitoring -----------------------------------------------------------------------------


def metric_names(text: str) -> set[str]:
    """bitrix24_bridge_* names in PromQL, histogram series folded into their family."""
    names = set()
    for name in METRIC_RE.findall(text):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and base in HISTOGRAMS:
                name = base
        names.add(name)
    return names


def test_known_metrics_match_what_the_bridge_registers() -> None:
    def exposed(family: Metric) -> str:
        # prometheus_client drops "_total" from a counter's family name.
        return family.name + "_total" if family.type == "counter" else family.name

    registered = {exposed(f) for f in Metrics().registry.collect()}
    assert registered == KNOWN_METRICS | SCALED_METRICS

    registry = Metrics().registry
    diadoc_metrics(registry)
    with_diadoc = {exposed(f) for f in registry.collect()}
    assert with_diadoc - KNOWN_METRICS - SCALED_METRICS == DIADOC_METRICS


def test_dashboard_uses_only_known_metrics(chart: helm.Chart, full_values: dict[str, Any]) -> None:
    raw = (CHART_DIR / "dashboards" / "bitrix24-bridge.json").read_text()
    dashboard = json.loads(raw)
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= KNOWN_METRICS | DIADOC_METRICS, used - KNOWN_METRICS - DIADOC_METRICS
    # Every Bitrix24 metric is on the dashboard somewhere; Diadoc has its lag and throughput.
    assert used >= KNOWN_METRICS, KNOWN_METRICS - used
    assert used & DIADOC_METRICS == {
        "bitrix24_bridge_diadoc_lag_seconds",
        "bitrix24_bridge_diadoc_events_published_total",
    }
    configmap = render(chart, full_values)[("ConfigMap", "b24-bridge-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert json.loads(configmap["data"]["bitrix24-bridge.json"]) == dashboard


def test_alert_rules_cover_the_failure_modes(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    rule = one(render(chart, full_values), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    for r in rules:
        assert set(r) >= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert re.fullmatch(r"\d+[smh]", r["for"])
        assert {"summary", "description"} <= set(r["annotations"])
        # Scoped to this release's series.
        assert f'namespace="{NAMESPACE}"' in r["expr"]
    by_metric = {r["alert"]: metric_names(r["expr"]) for r in rules}
    assert set().union(*by_metric.values()) <= KNOWN_METRICS | DIADOC_METRICS
    assert by_metric == {
        "Bitrix24BridgeDown": set(),  # Prometheus's own `up`
        "Bitrix24BridgeBacklogGrowing": {"bitrix24_bridge_upstream_queue_depth"},
        "Bitrix24BridgeOldestEventTooOld": {
            "bitrix24_bridge_oldest_pending_event_timestamp_seconds"
        },
        "Bitrix24BridgeDrainFailing": {"bitrix24_bridge_drain_passes_total"},
        "Bitrix24BridgeTokenRefreshFailing": {"bitrix24_bridge_token_refreshes_total"},
        "Bitrix24BridgeBrokerDisconnected": {"bitrix24_bridge_broker_connected"},
        "Bitrix24BridgePortalStopped": {"bitrix24_bridge_portal_stopped"},
        "Bitrix24BridgeBindingFailed": {"bitrix24_bridge_binding_failed"},
        "Bitrix24BridgeEventsParked": {"bitrix24_bridge_events_parked_total"},
        # Diadoc is on in the full values.
        "Bitrix24BridgeDiadocFeedLagging": {"bitrix24_bridge_diadoc_lag_seconds"},
        "Bitrix24BridgeDiadocMalformedEvents": {"bitrix24_bridge_diadoc_malformed_events_total"},
        "Bitrix24BridgeDiadocTieOverflow": {"bitrix24_bridge_diadoc_tie_overflows_total"},
        "Bitrix24BridgeDiadocApiSunset": {"bitrix24_bridge_diadoc_api_sunset_timestamp_seconds"},
    }
    # Prometheus's own template syntax survives Helm's rendering.
    assert "{{ $labels.portal }}" in json.dumps(rules)


def test_diadoc_lag_alert_only_while_diadoc_is_on(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    rule = one(render(chart, full_values), "PrometheusRule")
    (lagging,) = [
        r
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        if r["alert"] == "Bitrix24BridgeDiadocFeedLagging"
    ]
    # full-values.yaml sets the threshold to 20 minutes; the condition must hold 10 minutes.
    assert lagging["expr"].endswith("} > 1200")
    assert lagging["for"] == "10m"
    assert "{{ $labels.box }}" in lagging["annotations"]["summary"]

    default_threshold = render(
        chart, {"diadoc": DIADOC_ON, "metrics": {"prometheusRule": {"enabled": True}}}
    )
    (expr,) = [
        r["expr"]
        for group in one(default_threshold, "PrometheusRule")["spec"]["groups"]
        for r in group["rules"]
        if r["alert"] == "Bitrix24BridgeDiadocFeedLagging"
    ]
    assert expr.endswith("} > 900")  # 15 minutes

    off = render(chart, {**full_values, "diadoc": {"enabled": False}})
    alerts = {r["alert"] for g in one(off, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert "Bitrix24BridgeDiadocFeedLagging" not in alerts


def test_service_monitor_scrapes_metrics_on_the_http_port(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    objects = render(chart, full_values)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    service_labels = one(objects, "Service")["metadata"]["labels"]
    assert selector.items() <= service_labels.items()


# --- values an operator sets ----------------------------------------------------------------


def deployment_is_valid(objects: Manifests) -> None:
    doc = one(objects, "Deployment")
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize("tls", [None, [], [{"secretName": "other", "hosts": ["other.example"]}]])
def test_handler_url_derived_from_the_ingress_is_https(
    chart: helm.Chart, tls: list[dict[str, Any]] | None
) -> None:
    # No tls block (TLS ends at a load balancer in front) must not turn the handler URL
    # Bitrix24 sends tokens to into plain http.
    ingress: dict[str, Any] = {"enabled": True, "hosts": ["hook.example.org"]}
    if tls is not None:
        ingress["tls"] = tls
    objects = render(chart, {"ingress": ingress})
    assert env_config(objects)["BRIDGE_PUBLIC_URL"] == "https://hook.example.org"
    # An explicit publicUrl is the way to choose anything else.
    explicit = render(chart, {"ingress": ingress, "config": {"publicUrl": "http://10.0.0.5:8080/"}})
    assert env_config(explicit)["BRIDGE_PUBLIC_URL"] == "http://10.0.0.5:8080"


def test_ingress_hosts_as_names_or_host_objects(chart: helm.Chart) -> None:
    for hosts in (["hook.example.org"], [{"host": "hook.example.org"}]):
        objects = render(chart, {"ingress": {"enabled": True, "hosts": hosts}})
        assert one(objects, "Ingress")["spec"]["rules"][0]["host"] == "hook.example.org"
        assert env_config(objects)["BRIDGE_PUBLIC_URL"] == "https://hook.example.org"
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_raw(chart, {"ingress": {"hosts": [{"name": "hook.example.org"}]}})


@pytest.mark.parametrize(
    "name",
    [
        "bridge_amqp_url",
        "Bridge_Client_Secret",
        "BRIDGE_STATE_KEY",
        "bridge_refresh_token",
        "bridge_application_token",
        "bridge_diadoc_client_secret",
        "Bridge_Diadoc_Refresh_Token",
        "bridge_state_url",
        "Bridge_State_Url",
    ],
)
def test_extra_env_refuses_secret_names_in_any_case(chart: helm.Chart, name: str) -> None:
    value = "amqp://bridge:pa55word@rabbitmq:5672/"
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as refused:
        render_raw(chart, {"config": {"extraEnv": {name: value}}})
    assert name in str(refused.value)
    assert "pa55word" not in str(refused.value)  # the error names the key, never the value


def test_extra_env_takes_other_names(chart: helm.Chart) -> None:
    objects = render(chart, {"config": {"extraEnv": {"bridge_page_size": "10", "TZ": "UTC"}}})
    assert env_config(objects)["bridge_page_size"] == "10"


def test_global_image_registry_prefixes_the_repository(chart: helm.Chart) -> None:
    appversion = chart.metadata["appVersion"]
    values = {"global": {"imageRegistry": "mirror.example:5000/"}}
    assert container(render(chart, values))["image"] == (
        f"mirror.example:5000/bitrix24-bridge:{appversion}"
    )
    digest = "sha256:" + "b" * 64
    pinned = {**values, "image": {"repository": "team/bridge", "digest": digest}}
    assert container(render(chart, pinned))["image"] == f"mirror.example:5000/team/bridge@{digest}"
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_raw(chart, {"global": {"imageRegistry": 5}})


def test_security_contexts_can_be_switched_off(chart: helm.Chart) -> None:
    on = render(chart)
    pod = one(on, "Deployment")["spec"]["template"]["spec"]
    assert "enabled" not in pod["securityContext"]
    assert "enabled" not in container(on)["securityContext"]

    off = render(
        chart, {"podSecurityContext": {"enabled": False}, "securityContext": {"enabled": False}}
    )
    deployment_is_valid(off)
    pod = one(off, "Deployment")["spec"]["template"]["spec"]
    assert "securityContext" not in pod
    assert "securityContext" not in container(off)
    only_pod_off = render(chart, {"podSecurityContext": {"enabled": False}})
    deployment_is_valid(only_pod_off)
    assert container(only_pod_off)["securityContext"]["readOnlyRootFilesystem"] is True


# --- scaled mode (several replicas on PostgreSQL) --------------------------------------------

STATE_URL = "postgresql://bridge:pg-pa55@pg-rw.db:5432/bridge"
SCALED: dict[str, Any] = {"replicaCount": 3, "secrets": {**SECRETS, "stateUrl": STATE_URL}}
# Where the state URL may come from, and the secretKeyRef each gives BRIDGE_STATE_URL.
STATE_URL_SOURCES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "chart-secret": (
        {"secrets": {**SECRETS, "stateUrl": STATE_URL}},
        {"name": FULLNAME, "key": "BRIDGE_STATE_URL"},
    ),
    "existing-secret": (
        {"existingSecret": "creds", "existingSecretKeys": {"stateUrl": "pg-url"}},
        {"name": "creds", "key": "pg-url"},
    ),
    "own-secret": (
        {"secrets": SECRETS, "stateUrlSecret": {"name": "pg-app"}},
        {"name": "pg-app", "key": "uri"},
    ),
}


def pod_spec(objects: Manifests) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def env_entries(objects: Manifests) -> dict[str, dict[str, Any]]:
    return {env["name"]: env for env in container(objects).get("env", [])}


def test_default_is_one_replica_on_a_claim_and_no_scaled_mode_setting(chart: helm.Chart) -> None:
    objects = render(chart, {"secrets": SECRETS})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert one(objects, "PersistentVolumeClaim")
    spec = pod_spec(objects)
    assert spec["terminationGracePeriodSeconds"] == 30
    assert "affinity" not in spec
    config = env_config(objects)
    assert "BRIDGE_STATE_PATH" in config
    assert not {"BRIDGE_SHARDS", "BRIDGE_LEASE_TTL", "BRIDGE_LEASE_RENEW"} & set(config)
    assert not {"BRIDGE_STATE_URL", "BRIDGE_REPLICA_ID"} & set(env_entries(objects))
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert "unhealthyPodEvictionPolicy" not in pdb
    assert "Scaled mode" not in notes(chart, {"secrets": SECRETS})


@pytest.mark.parametrize("replicas", [3, "3"])
def test_several_replicas_without_a_state_url_are_refused(
    chart: helm.Chart, replicas: int | str
) -> None:
    values: dict[str, Any] = {"replicaCount": replicas}
    if isinstance(replicas, str):
        # As `--set replicaCount=3` gives it: Helm types the number.
        values = helm.parse_set_string("replicaCount=3")
    with pytest.raises(helm.HelmValuesError) as refused:
        render_raw(chart, {**values, "secrets": SECRETS})
    message = str(refused.value)
    # The message names the limit and where the state URL would go.
    assert "at '/replicaCount': maximum: got 3, want 1" in message
    assert "at '/secrets/stateUrl'" in message
    # With an existing Secret, the key to name there.
    with pytest.raises(helm.HelmValuesError) as refused:
        render_raw(chart, {**values, "existingSecret": "creds"})
    assert "at '/replicaCount': maximum: got 3, want 1" in str(refused.value)
    assert "at '/existingSecretKeys/stateUrl'" in str(refused.value)
    # secrets.* is ignored beside existingSecret, so a state URL there does not count.
    with pytest.raises(helm.HelmValuesError, match="replicaCount"):
        render_raw(chart, {**values, "existingSecret": "creds", "secrets": {"stateUrl": STATE_URL}})


@pytest.mark.parametrize("source", STATE_URL_SOURCES)
def test_scaled_mode_rolls_pods_without_a_state_volume(chart: helm.Chart, source: str) -> None:
    given, _ = STATE_URL_SOURCES[source]
    objects = render(chart, {**given, "replicaCount": 3})
    deployment_is_valid(objects)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert not [kind for kind, _ in objects if kind == "PersistentVolumeClaim"]
    spec = pod_spec(objects)
    # Only the writable /tmp of the read-only root filesystem; no volume for the state.
    assert [v["name"] for v in spec["volumes"]] == ["tmp"]
    assert "emptyDir" in spec["volumes"][0]
    assert container(objects)["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert container(objects)["securityContext"]["readOnlyRootFilesystem"] is True
    # No state file: without its URL a pod cannot fall back to a file of its own.
    assert "BRIDGE_STATE_PATH" not in env_config(objects)


@pytest.mark.parametrize("source", STATE_URL_SOURCES)
def test_scaled_mode_takes_the_state_url_from_a_secret(chart: helm.Chart, source: str) -> None:
    given, ref = STATE_URL_SOURCES[source]
    objects = render(chart, {**given, "replicaCount": 3})
    env = env_entries(objects)
    # Required: a missing key stops the pod instead of starting it without the shared state.
    assert env["BRIDGE_STATE_URL"]["valueFrom"] == {"secretKeyRef": ref}
    assert env["BRIDGE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    rendered_config = json.dumps(env_config(objects))
    assert "BRIDGE_STATE_URL" not in rendered_config
    assert "pg-pa55" not in rendered_config
    if source == "chart-secret":
        data = objects[("Secret", FULLNAME)]["data"]
        assert base64.b64decode(data["BRIDGE_STATE_URL"]).decode() == STATE_URL
    text = notes(chart, {**given, "replicaCount": 3})
    assert "Scaled mode is on: 3 replica(s)" in text
    assert f"from the Secret {ref['name']}, key {ref['key']}." in text
    assert "pg-pa55" not in text


def test_scaled_mode_settings_reach_the_bridge(
    chart: helm.Chart, scaled_values: dict[str, Any]
) -> None:
    config = env_config(render(chart, scaled_values))
    lease = {
        k: v
        for k, v in config.items()
        if k in {"BRIDGE_SHARDS", "BRIDGE_LEASE_TTL", "BRIDGE_LEASE_RENEW"}
    }
    assert lease == {"BRIDGE_SHARDS": "32", "BRIDGE_LEASE_TTL": "15", "BRIDGE_LEASE_RENEW": "3"}
    # The bridge accepts what the chart renders, and reads the same values back.
    from bridge.settings import load_settings

    settings = load_settings({**config, "BRIDGE_STATE_URL": STATE_URL})
    assert settings.shards == 32
    assert settings.lease_ttl == 15
    assert settings.lease_renew == 3
    assert settings.state_url is not None

    fractional = env_config(
        render(chart, {**SCALED, "config": {"leaseTtl": 7.5, "leaseRenew": 1.5, "shards": 1}})
    )
    assert fractional["BRIDGE_LEASE_TTL"] == "7.5"
    assert fractional["BRIDGE_LEASE_RENEW"] == "1.5"
    assert fractional["BRIDGE_SHARDS"] == "1"


def test_scaled_mode_gives_the_handover_time_before_sigkill(chart: helm.Chart) -> None:
    # The page in flight (SHUTDOWN_BOUND), then the shard handover, bounded by the lease TTL.
    from bridge.bitrix24.portals import SHUTDOWN_BOUND

    def grace(values: dict[str, Any]) -> int:
        result: int = pod_spec(render(chart, values))["terminationGracePeriodSeconds"]
        return result

    assert grace(SCALED) >= SHUTDOWN_BOUND + 10 + 5
    assert grace({**SCALED, "config": {"leaseTtl": 30, "leaseRenew": 5}}) >= SHUTDOWN_BOUND + 30
    # A longer grace period asked for is kept.
    assert grace({**SCALED, "terminationGracePeriodSeconds": 120}) == 120


def test_scaled_replicas_spread_over_nodes_softly(
    chart: helm.Chart, scaled_values: dict[str, Any]
) -> None:
    objects = render(chart, SCALED)
    anti = pod_spec(objects)["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector
    assert selector.items() <= pod_labels.items()

    # The operator's own node affinity is kept beside it; their own anti-affinity replaces it.
    merged = pod_spec(render(chart, scaled_values))["affinity"]
    assert set(merged) == {"nodeAffinity", "podAntiAffinity"}
    assert merged["nodeAffinity"] == scaled_values["affinity"]["nodeAffinity"]
    off = pod_spec(render(chart, {**SCALED, "affinity": {"podAntiAffinity": {}}}))
    assert off["affinity"] == {"podAntiAffinity": {}}
    # One replica has nothing to spread.
    single = pod_spec(render(chart, {**SCALED, "replicaCount": 1}))
    assert "affinity" not in single


def test_scaled_pdb_keeps_a_replica_and_selects_the_pods(chart: helm.Chart) -> None:
    objects = render(chart, SCALED)
    pdb = one(objects, "PodDisruptionBudget")
    kubernetes_validate.validate(pdb, KUBE_VERSIONS[0], strict=True)
    spec = pdb["spec"]
    assert spec["maxUnavailable"] == 1  # of 3: two keep running, one handover at a time
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["selector"] == one(objects, "Deployment")["spec"]["selector"]

    # A budget that would let every replica go is refused; Kubernetes rounds percentages up.
    assert one(
        render(chart, {**SCALED, "podDisruptionBudget": {"maxUnavailable": "50%"}}),
        "PodDisruptionBudget",
    )
    for everyone in (3, 5, "100%", "67%"):
        with pytest.raises(helm.HelmRenderError, match="one replica stays"):
            render_raw(chart, {**SCALED, "podDisruptionBudget": {"maxUnavailable": everyone}})
    # One replica in scaled mode: the single pod may still be evicted, as by default.
    assert render(
        chart, {**SCALED, "replicaCount": 1, "podDisruptionBudget": {"maxUnavailable": 1}}
    )
    assert not [
        k
        for k, _ in render(chart, {**SCALED, "podDisruptionBudget": {"enabled": False}})
        if k == "PodDisruptionBudget"
    ]


def test_state_url_mistakes_fail_without_showing_it(chart: helm.Chart) -> None:
    twice = {**SCALED, "stateUrlSecret": {"name": "pg-app"}}
    with pytest.raises(helm.HelmRenderError, match="state URL is given twice") as refused:
        render_raw(chart, twice)
    assert "pg-pa55" not in str(refused.value)
    wrong = "mysql://bridge:pg-pa55@db:3306/bridge"
    for replicas in (1, 3):
        with pytest.raises(helm.HelmRenderError, match="postgresql://") as refused:
            render_raw(chart, {"replicaCount": replicas, "secrets": {"stateUrl": wrong}})
        assert "pg-pa55" not in str(refused.value)
    with pytest.raises(helm.HelmRenderError, match=r"leaseRenew \(10\) must be shorter"):
        render_raw(chart, {**SCALED, "config": {"leaseTtl": 10, "leaseRenew": 10}})


def test_one_replica_with_a_state_url_is_scaled_mode_too(chart: helm.Chart) -> None:
    objects = render(chart, {**SCALED, "replicaCount": 1})
    assert one(objects, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "BRIDGE_REPLICA_ID" in env_entries(objects)
    assert not [kind for kind, _ in objects if kind == "PersistentVolumeClaim"]
    # Persistence values are not used: not even a warning about them.
    assert "persistence is disabled" not in notes(
        chart, {**SCALED, "persistence": {"enabled": False}}
    )


def test_network_policy_lets_scaled_replicas_reach_postgresql(
    chart: helm.Chart, full_values: dict[str, Any]
) -> None:
    def postgres_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
        policy = one(render(chart, values), "NetworkPolicy")["spec"]
        return [r for r in policy["egress"] if {"port": 5432, "protocol": "TCP"} in r["ports"]]

    assert postgres_rules(full_values) == []  # SQLite: no database to reach
    scaled = {**full_values, "replicaCount": 3, "existingSecretKeys": {"stateUrl": "pg-url"}}
    assert postgres_rules(scaled) == [{"ports": [{"port": 5432, "protocol": "TCP"}]}]
    database = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}}]
    narrowed = {
        **scaled,
        "networkPolicy": {**full_values["networkPolicy"], "egress": {"postgresTo": database}},
    }
    (rule,) = postgres_rules(narrowed)
    assert rule["to"] == database
    deployment_is_valid(render(chart, narrowed))
    kubernetes_validate.validate(
        one(render(chart, narrowed), "NetworkPolicy"), KUBE_VERSIONS[-1], strict=True
    )


def test_readme_scaled_mode_flags_render_as_described(chart: helm.Chart) -> None:
    readme = (CHART_DIR.parent / "README.md").read_text()
    (flags,) = [
        c for c in re.findall(r"`([^`\n]+)`", readme) if c.startswith("--set replicaCount=")
    ]
    sets = re.findall(r"--set (\S+)", flags)
    assert len(sets) == 2
    values = helm.parse_set_string(",".join(sets))
    objects = render(chart, {**values, "secrets": SECRETS})
    for doc in objects.values():
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    assert one(objects, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    # The Secret the README names, under the key it names.
    ref = env_entries(objects)["BRIDGE_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert f"the key `{ref['key']}` of the Secret `{ref['name']}`" in " ".join(readme.split())
    # And the example values file the README points to.
    assert "`helm/ci/scaled-values.yaml`" in readme
    assert SCALED_VALUES.is_file()
