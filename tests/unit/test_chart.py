"""The Helm chart: lint, golden renders, the values schema, RBAC modes, the observability bundle.

`helm` is the locally built binary (no cluster, no network: `helm lint` and `helm template` only).
Regenerate the goldens after an intended change with
`UPDATE_GOLDENS=1 pytest tests/unit/test_chart.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet import metrics
from celery_fleet.api import crdgen
from celery_fleet.planning.beat_workload import ELECTOR_SOURCE
from celery_fleet.rbac import rules
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "celery-fleet"
GOLDEN_DIR = Path(__file__).parent / "golden" / "chart"
CUSTOM_VALUES = GOLDEN_DIR / "custom-values.yaml"
RELEASE = "celery-fleet"
RELEASE_NAMESPACE = "celery-fleet"
ALERTS = {
    "CeleryFleetQueueBacklog",
    "CeleryFleetTierAtMaxReplicas",
    "CeleryFleetBrokerUnreachable",
    "CeleryFleetBeatWithoutLeader",
    "CeleryFleetOperatorDown",
    "CeleryFleetReconcileErrors",
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc


def template_args(*extra: str) -> list[str]:
    # No --kube-version: helm is built with its Kubernetes version stamped, so it renders offline.
    return ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *extra]


@cache
def rendered_text(*extra: str) -> str:
    return helm(*template_args(*extra)).stdout


def rendered(*extra: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered_text(*extra)) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


CUSTOM = ("--values", str(CUSTOM_VALUES))


# --- lint and goldens


@pytest.mark.parametrize("values", [pytest.param((), id="default"), pytest.param(CUSTOM, id="custom")])
def test_helm_lint_is_clean(values: tuple[str, ...]) -> None:
    proc = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def rendered_notes(tmp_path: Path, *values: str) -> str:
    """NOTES.txt as `helm install` prints it, rendered offline by helm's own engine: `helm template` skips
    NOTES.txt and `helm install --dry-run=client` still needs a cluster, so a copy of the chart carries the
    notes verbatim inside a define and one ConfigMap renders it."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_under_test.tpl").write_text(
        '{{- define "notes-under-test" -}}\n' + notes + "{{- end -}}\n"
    )
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes-under-test}\ndata:\n"
        '  notes: {{ include "notes-under-test" . | toJson }}\n'
    )
    out = helm("template", RELEASE, str(chart), "--namespace", RELEASE_NAMESPACE, *values,
               "--show-only", "templates/notes-under-test.yaml").stdout  # fmt: skip
    return str(yaml.safe_load(out)["data"]["notes"])


def test_notes_render_the_default_install(tmp_path: Path) -> None:
    notes = rendered_notes(tmp_path)
    assert "<no value>" not in notes
    assert f"is installed as release {RELEASE} in namespace {RELEASE_NAMESPACE}." in notes
    assert "It serves every namespace." in notes
    assert f"kubectl -n {RELEASE_NAMESPACE} rollout status deployment/{RELEASE}\n" in notes
    assert "kubectl -n <namespace> create secret generic shop-broker" in notes
    assert "(set metrics.serviceMonitor.enabled=true for the Prometheus Operator)" in notes
    assert "Alerts:" not in notes and "Dashboard:" not in notes


def test_notes_follow_custom_values(tmp_path: Path) -> None:
    values = yaml.safe_load(CUSTOM_VALUES.read_text())
    notes = rendered_notes(tmp_path, *CUSTOM)
    assert "<no value>" not in notes
    assert f"It serves only these namespaces: {', '.join(values['watchNamespaces'])}." in notes
    assert f"kubectl -n {values['watchNamespaces'][0]} create secret generic shop-broker" in notes
    assert f"these Secrets: {', '.join(values['rbac']['brokerSecretNames'])}:" in notes
    assert "serviceMonitor.enabled=true" not in notes
    assert f"Alerts: PrometheusRule {RELEASE}." in notes
    label = f"label {values['grafanaDashboard'].get('label', 'grafana_dashboard')}="
    assert f"Dashboard: ConfigMap {RELEASE}-dashboard ({label}" in notes


def test_notes_name_the_argocd_health_keys_of_both_kinds(tmp_path: Path) -> None:
    notes = rendered_notes(tmp_path)
    for kind in ("CeleryWorkerPool", "CeleryBeat"):
        assert f"resource.customizations.health.celeryfleet.io_{kind}\n" in notes
    assert (CHART / "argocd" / "health.lua").is_file(), "the notes point at the chart's health script"


@pytest.mark.parametrize(
    ("name", "values"), [pytest.param("default", (), id="default"), pytest.param("custom", CUSTOM, id="custom")]
)
def test_template_matches_golden(name: str, values: tuple[str, ...]) -> None:
    # Without the CRDs: they are crdgen's output, compared with it in test_crds_are_the_generated_copy.
    text = rendered_text(*values, "--set", "crds.install=false")
    path = GOLDEN_DIR / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDENS") == "1":
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `UPDATE_GOLDENS=1 pytest {__file__}` and review it")
    assert text == path.read_text(), f"{path} differs: run `UPDATE_GOLDENS=1 pytest {__file__}` and review the diff"


DOWNWARD_API_ENV = [
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
]


def test_default_install_objects() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered())
    assert kinds == [
        ("ClusterRole", "celery-fleet"),
        ("ClusterRole", "celery-fleet-cluster"),
        ("ClusterRole", "celery-fleet-edit"),
        ("ClusterRole", "celery-fleet-view"),
        ("ClusterRoleBinding", "celery-fleet"),
        ("ClusterRoleBinding", "celery-fleet-cluster"),
        ("CustomResourceDefinition", "celerybeats.celeryfleet.io"),
        ("CustomResourceDefinition", "celeryworkerpools.celeryfleet.io"),
        ("Deployment", "celery-fleet"),
        ("NetworkPolicy", "celery-fleet"),
        ("PodDisruptionBudget", "celery-fleet"),
        ("Role", "celery-fleet-leader-election"),
        ("RoleBinding", "celery-fleet-leader-election"),
        ("Service", "celery-fleet-metrics"),
        ("ServiceAccount", "celery-fleet"),
    ]


def annotations(doc: dict[str, Any]) -> dict[str, str]:
    return doc["metadata"].get("annotations") or {}


def test_crds_are_the_generated_copy() -> None:
    """Templated (so `helm upgrade` upgrades them), kept on uninstall, labelled as the release."""
    generated = {c["metadata"]["name"]: c for c in crdgen.generate_crds().values()}
    crds = {d["metadata"]["name"]: d for d in find(rendered(), "CustomResourceDefinition")}
    assert sorted(crds) == ["celerybeats.celeryfleet.io", "celeryworkerpools.celeryfleet.io"]
    for name, crd in crds.items():
        assert crd["spec"] == generated[name]["spec"]
        assert crd["metadata"]["annotations"] == generated[name]["metadata"]["annotations"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert not (CHART / "crds").exists(), "Helm would install crds/ once and never upgrade it"
    # Nothing else in the chart is kept by Helm: only what an uninstall must not cascade from.
    kept = [
        d["metadata"]["name"]
        for d in rendered()
        if "helm.sh/resource-policy" in (d["metadata"].get("annotations") or {})
    ]
    assert sorted(kept) == sorted(crds)


@pytest.mark.parametrize(
    ("setting", "names", "kept"),
    [
        pytest.param("crds.install=false", [], False, id="managed-elsewhere"),
        pytest.param("crds.keep=false", ["celerybeats.celeryfleet.io", "celeryworkerpools.celeryfleet.io"], False,
                     id="deleted-on-uninstall"),
    ],
)  # fmt: skip
def test_crds_values(setting: str, names: list[str], kept: bool) -> None:
    crds = find(rendered("--set", setting), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == names
    for crd in crds:
        assert ("helm.sh/resource-policy" in crd["metadata"]["annotations"]) is kept
        assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Prune=false,Delete=false"


# --- the operator Deployment


def test_operator_pod_is_restricted() -> None:
    pod = one(rendered(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_operator_args_probes_and_ports() -> None:
    deployment = one(rendered(), "Deployment")
    # Two replicas under leader election: one acts, one stands by; a rolling update is safe.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "run"
    assert args[-5:] == [
        "--leader-elect",
        "--lease-name=celery-fleet-operator",
        "--lease-duration=15",
        "--renew-deadline=10",
        "--retry-period=2",
    ]
    assert container["env"][:3] == DOWNWARD_API_ENV
    assert "--all-namespaces" in args
    assert "--health-endpoint=http://0.0.0.0:8080/healthz" in args
    assert {"name": "CELERY_FLEET_ELECTOR_IMAGE", "value": "ghcr.io/celery-fleet/celery-fleet:0.1.0"} in container[
        "env"
    ]
    assert container["image"] == "ghcr.io/celery-fleet/celery-fleet:0.1.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 8000, "http-health": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-health"}
    service = one(rendered(), "Service")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8000, "targetPort": "http-metrics", "protocol": "TCP"}
    ]


def test_custom_values_reach_the_operator() -> None:
    docs = rendered(*CUSTOM)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    assert container["image"] == f"registry.example/platform/celery-fleet@{digest}"
    args = container["args"]
    assert "--namespace=shop" in args and "--namespace=billing" in args and "--all-namespaces" not in args
    assert "--json-logs" not in args and "--log-level=DEBUG" in args and "--poll-interval=0.5" in args
    assert container["env"] == [
        *DOWNWARD_API_ENV,
        {"name": "CELERY_FLEET_ELECTOR_IMAGE", "value": "registry.example/platform/celery-fleet-elector:0.1.0"},
        {"name": "TZ", "value": "UTC"},
    ]
    assert "--metrics-port=9100" in args and "--health-endpoint=http://0.0.0.0:9180/healthz" in args


def test_elector_image_defaults_to_the_operator_image() -> None:
    docs = rendered("--set", "image.tag=1.2.3")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/celery-fleet/celery-fleet:1.2.3"
    assert container["env"] == [
        *DOWNWARD_API_ENV,
        {"name": "CELERY_FLEET_ELECTOR_IMAGE", "value": "ghcr.io/celery-fleet/celery-fleet:1.2.3"},
    ]
    assert ELECTOR_SOURCE == "/opt/celery-fleet/elector.pyz"  # where the Dockerfile puts it


def test_deploy_base_runs_the_same_operator_as_the_chart() -> None:
    # deploy/operator.yaml is hand-kept; it must not drift from the chart's defaults.
    chart = rendered()
    base = list(yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text()))
    for kind in ("Deployment", "Service"):
        chart_obj, base_obj = one(chart, kind), one(base, kind)
        assert chart_obj["metadata"]["name"] == base_obj["metadata"]["name"]
        if kind == "Deployment":
            assert base_obj["spec"]["template"]["spec"] == chart_obj["spec"]["template"]["spec"]
            assert base_obj["spec"]["strategy"] == chart_obj["spec"]["strategy"]
        else:
            assert base_obj["spec"] == chart_obj["spec"]
    assert one(base, "ServiceAccount")["metadata"]["name"] == one(chart, "ServiceAccount")["metadata"]["name"]


# --- RBAC modes


def _rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["rules"])


def test_all_namespaces_rbac_is_generated_from_the_rules() -> None:
    docs = rendered()
    mode = rules.Mode(all_namespaces=True)
    assert _rules(one(docs, "ClusterRole", "celery-fleet")) == rules.policy_rules(rules.Scope.WATCHED, mode)
    assert _rules(one(docs, "ClusterRole", "celery-fleet-cluster")) == rules.policy_rules(rules.Scope.CLUSTER, mode)
    # The one Role: leader election, in the release namespace.
    (role,) = find(docs, "Role")
    assert role["metadata"]["namespace"] == "celery-fleet"
    assert _rules(role) == rules.policy_rules(rules.Scope.OPERATOR_NAMESPACE, mode)
    for binding in find(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "celery-fleet", "namespace": "celery-fleet"}]


def test_listed_namespaces_get_a_role_each_and_nothing_cluster_wide() -> None:
    docs = rendered(*CUSTOM)
    names = {"rbac.brokerSecretNames": ["shop-broker", "billing-broker"]}
    mode = rules.Mode(all_namespaces=False, resource_names=names)
    roles = [r for r in find(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["billing", "shop"]
    for role in roles:
        assert _rules(role) == rules.policy_rules(rules.Scope.WATCHED, mode)
    bindings = [b for b in find(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["billing", "shop"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "fleet-operator", "namespace": RELEASE_NAMESPACE}
        ]
    (cluster_role,) = [r for r in find(docs, "ClusterRole") if not r["metadata"]["name"].endswith(("-view", "-edit"))]
    assert _rules(cluster_role) == rules.policy_rules(rules.Scope.CLUSTER, mode)
    secrets = [r for r in _rules(roles[0]) if "secrets" in r["resources"]]
    assert secrets == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["shop-broker", "billing-broker"],
        }
    ]


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    docs = rendered(
        "--set", "rbac.create=false", "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=x"
    )
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "x"


# --- the values schema


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        pytest.param("operator.logLevel=LOUD", "at '/operator/logLevel': value must be one of", id="log-level"),
        pytest.param(
            "leaderElection.enabled=false,replicaCount=2",
            "at '/replicaCount': maximum: got 2, want 1",
            id="two-replicas-without-leader-election",
        ),
        pytest.param("watchNamespaces={Shop_NS}", "at '/watchNamespaces/0': 'Shop_NS' does not match", id="ns-name"),
        pytest.param("operator.pollIntervalSeconds=0", "at '/operator/pollIntervalSeconds'", id="poll-interval"),
        pytest.param("prometheusRule.queueBacklog.for=ten", "at '/prometheusRule/queueBacklog/for': 'ten'", id="for"),
        pytest.param("image.digest=latest", "at '/image/digest': 'latest' does not match", id="digest"),
        pytest.param("image.pullPolicy=Sometimes", "at '/image/pullPolicy'", id="pull-policy"),
        pytest.param("rbac.create=yes", "at '/rbac/create': got string, want boolean", id="boolean"),
        pytest.param("watchNamespace={shop}", "additional properties 'watchNamespace' not allowed", id="typo"),
        pytest.param(
            "prometheusRule.reconcileErrors.ratio=5", "at '/prometheusRule/reconcileErrors/ratio'", id="ratio"
        ),
    ],
)
def test_schema_rejects_bad_values_naming_them(setting: str, message: str) -> None:
    proc = helm(*template_args("--set", setting), check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_schema_covers_every_default_value() -> None:
    # additionalProperties=false everywhere: a value missing from the schema would be rejected,
    # so the defaults rendering at all proves the schema knows them; this keeps it explicit.
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and node.get("properties") is not None:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


# --- observability


def _metric_names() -> set[str]:
    names: set[str] = set()
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, []))
    return names


def _referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bcelery_fleet_[a-z_]+\b", expr))


def _alerts() -> dict[str, dict[str, Any]]:
    rule = one(rendered("--set", "prometheusRule.enabled=true"), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def _dashboard() -> dict[str, Any]:
    cm = one(rendered("--set", "grafanaDashboard.enabled=true"), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return dict(json.loads(cm["data"]["celery-fleet.json"]))


def _dashboard_exprs() -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in _dashboard()["panels"] if p["type"] != "row"}


def test_the_alerts_are_all_there() -> None:
    alerts = _alerts()
    assert set(alerts) == ALERTS
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert alerts["CeleryFleetQueueBacklog"]["for"] == "10m"
    assert alerts["CeleryFleetQueueBacklog"]["expr"].endswith("> 100")


def test_alert_and_dashboard_metrics_exist_in_the_operator() -> None:
    known = _metric_names()
    exprs = [r["expr"] for r in _alerts().values()] + [e for es in _dashboard_exprs().values() for e in es]
    for expr in exprs:
        unknown = _referenced(expr) - known
        assert not unknown, f"{expr!r} uses metrics the operator does not export: {unknown}"
    used = set().union(*(_referenced(e) for e in exprs))
    for required in (
        "celery_fleet_queue_depth",
        "celery_fleet_queue_in_flight",
        "celery_fleet_tier_desired_replicas",
        "celery_fleet_tier_replicas",
        "celery_fleet_scaling_decisions_total",
        "celery_fleet_beat_has_leader",
        "celery_fleet_broker_reachable",
    ):
        assert required in used, f"{required} is neither alerted on nor on the dashboard"


def _selectors(expr: str) -> set[str]:
    promql = pytest.importorskip("promql_parser", reason="PromQL syntax check needs promql-parser (dev extra)")
    tree = promql.parse(expr)  # raises ValueError on a syntax error
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector) and node.name:
            found.add(node.name)

    promql.walk(tree, visit)
    return found


def test_alert_expressions_are_valid_promql() -> None:
    for name, rule in _alerts().items():
        try:
            selectors = _selectors(rule["expr"])
        except ValueError as err:
            pytest.fail(f"{name}: {err}: {rule['expr']}")
        assert selectors, name


def test_dashboard_expressions_are_valid_promql() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "celery-fleet"
    variables = {"$namespace": ".*", "$pool": ".*", "$__rate_interval": "1m"}
    for title, exprs in _dashboard_exprs().items():
        assert exprs, f"panel {title!r} has no query"
        for expr in exprs:
            for var, value in variables.items():
                expr = expr.replace(var, value)
            try:
                _selectors(expr)
            except ValueError as err:
                pytest.fail(f"panel {title!r}: {err}: {expr}")


def test_operator_down_alert_matches_the_scrape_job() -> None:
    # The Prometheus Operator names the job after the Service; the alert must look for that job.
    docs = rendered("--set", "prometheusRule.enabled=true", "--set", "metrics.serviceMonitor.enabled=true")
    service = one(docs, "Service")["metadata"]["name"]
    assert f'job="{service}"' in _alerts()["CeleryFleetOperatorDown"]["expr"]
    # Every replica is up under leader election (the standby too): a fleet nobody leads is down as well.
    assert "absent(leader_election_master_status{" in _alerts()["CeleryFleetOperatorDown"]["expr"]
    single = one(rendered("--set", "prometheusRule.enabled=true", "--set", "leaderElection.enabled=false",
                          "--set", "replicaCount=1"), "PrometheusRule")  # fmt: skip
    (down,) = [r for g in single["spec"]["groups"] for r in g["rules"] if r.get("alert") == "CeleryFleetOperatorDown"]
    assert "leader_election_master_status" not in down["expr"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_datasource_variables_and_ids() -> None:
    """Grafana imports it anywhere: one datasource variable, no dangling or unused variables, stable ids."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    builtin = {"__rate_interval", "__interval", "__range", "__all"}
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert not (used - set(variables) - builtin), f"variables used but not defined: {used - set(variables) - builtin}"
    assert not (set(variables) - used), f"variables defined but never used: {set(variables) - used}"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    assert dashboard["uid"] == "celery-fleet" and dashboard["title"]


# --- HA monitoring (issue 27)


def test_every_alert_links_its_runbook_section() -> None:
    rule = one(rendered("--set", "prometheusRule.enabled=true"), "PrometheusRule")
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    sections = {line[3:].strip().lower() for line in runbooks.splitlines() if line.startswith("## ")}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == ALERTS
    for alert in alerts:
        base, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert base == "https://github.com/celery-fleet/celery-fleet/blob/main/docs/runbooks.md"
        assert anchor == alert["alert"].lower() and anchor in sections, alert["alert"]


def test_pod_monitor_scrapes_every_replica_under_the_alerts_job() -> None:
    assert find(rendered(), "PodMonitor") == []
    relabel = "metrics.podMonitor.relabelings[0]"
    docs = rendered("--set", "metrics.podMonitor.enabled=true", "--set", f"{relabel}.action=keep",
                    "--set", f"{relabel}.sourceLabels[0]=__meta_kubernetes_pod_ready")  # fmt: skip
    monitor = one(docs, "PodMonitor")
    deployment = one(docs, "Deployment")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["selector"]["matchLabels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    # The OperatorDown alert selects job=<metrics Service>: the PodMonitor's targets carry the same job.
    service = one(docs, "Service")["metadata"]["name"]
    assert endpoint["relabelings"][0] == {"targetLabel": "job", "replacement": service}
    assert endpoint["relabelings"][1]["action"] == "keep"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param((), 1, id="two-replicas-get-a-pdb"),
        pytest.param(("--set", "replicaCount=1", "--set", "leaderElection.enabled=false"), 0, id="one-replica-none"),
        pytest.param(("--set", "podDisruptionBudget.enabled=false"), 0, id="disabled"),
    ],
)
def test_operator_pdb_only_with_more_than_one_replica(values: tuple[str, ...], expected: int) -> None:
    docs = rendered(*values)
    pdbs = find(docs, "PodDisruptionBudget")
    assert len(pdbs) == expected
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1
        assert (
            pdb["spec"]["selector"]["matchLabels"].items()
            <= one(docs, "Deployment")["spec"]["selector"]["matchLabels"].items()
        )


def test_replicas_spread_over_nodes_by_default() -> None:
    deployment = one(rendered(), "Deployment")
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    off = one(rendered("--set", "topologySpreadConstraints=null"), "Deployment")
    assert "topologySpreadConstraints" not in off["spec"]["template"]["spec"]
