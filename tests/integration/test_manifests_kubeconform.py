"""kubeconform -strict, offline, on the rendered chart (default and custom values), deploy/ and the samples.

The schemas come from the local cluster's own OpenAPI (v3, the apiserver we run against) and from our
generated CRDs, turned into kubeconform's per-kind JSON schemas with `additionalProperties: false` on every
object that lists its properties (what -strict needs), so an unknown or misspelt field fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ROOT, Cluster
from tests.support.tools import tool
from tests.unit.test_chart import CUSTOM_VALUES, helm, template_args

pytestmark = pytest.mark.integration
GROUP_VERSIONS = (
    "api/v1",
    "apis/apps/v1",
    "apis/rbac.authorization.k8s.io/v1",
    "apis/policy/v1",
    "apis/coordination.k8s.io/v1",
    "apis/networking.k8s.io/v1",
    "apis/apiextensions.k8s.io/v1",
)
LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
# Not judged: the Prometheus Operator's kinds (its CRDs are not in the local cluster and nothing is
# fetched online); their rules are judged by promtool instead (tests/unit/test_alert_rules.py).
SKIPPED = "ServiceMonitor,PrometheusRule"


def _strict(node: Any) -> None:
    if isinstance(node, dict):
        open_ = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
        if node.get("type") == "object" and "properties" in node and not open_:
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


def _file_name(kind: str, group: str, version: str) -> str:
    prefix = group.split(".")[0]
    return f"{kind.lower()}-{prefix}-{version}.json" if prefix else f"{kind.lower()}-{version}.json"


@pytest.fixture(scope="module")
def schemas(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas")
    for gv in GROUP_VERSIONS:
        components = json.loads(cluster.kubectl("get", "--raw", f"/openapi/v3/{gv}").stdout)["components"]["schemas"]
        _strict(components)
        for name, schema in components.items():
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                if gv != "api/v1" and not gvk["group"]:
                    continue  # meta types every group lists (WatchEvent, DeleteOptions)
                doc = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": components}}
                (out / _file_name(gvk["kind"], gvk["group"], gvk["version"])).write_text(json.dumps(doc))
    for crd_file in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        for version in crd["spec"]["versions"]:
            schema = json.loads(json.dumps(version["schema"]["openAPIV3Schema"]))
            _strict(schema)
            name = _file_name(crd["spec"]["names"]["kind"], crd["spec"]["group"], version["name"])
            (out / name).write_text(json.dumps(schema))
    return out


def kubeconform(schemas: Path, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("kubeconform")), "-strict", "-summary", "-output", "text",
         "-schema-location", str(schemas / LOCATION), "-skip", SKIPPED, *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra", [pytest.param((), id="default"), pytest.param(("-f", str(CUSTOM_VALUES)), id="custom")]
)
def test_chart_is_valid(schemas: Path, extra: tuple[str, ...], tmp_path: Path) -> None:
    rendered = tmp_path / "chart.yaml"
    everything = ("--set", "grafanaDashboard.enabled=true")
    rendered.write_text(helm(*template_args(*extra, *everything)).stdout)
    proc = kubeconform(schemas, rendered)
    assert proc.returncode == 0 and "Invalid: 0, Errors: 0" in proc.stdout, proc.stdout + proc.stderr


def test_deploy_and_samples_are_valid(schemas: Path) -> None:
    files = [p for p in sorted((ROOT / "deploy").rglob("*.yaml")) if p.name != "kustomization.yaml"]
    proc = kubeconform(schemas, *files)
    assert proc.returncode == 0 and "Invalid: 0, Errors: 0" in proc.stdout, proc.stdout + proc.stderr


def test_strict_catches_an_unknown_field(schemas: Path, tmp_path: Path) -> None:
    pool = yaml.safe_load((ROOT / "deploy" / "samples" / "pool-minimal.yaml").read_text())
    pool["spec"]["replicaz"] = 2
    containers = [{"name": "c", "imagee": "x"}]
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {}, "template": {"spec": {"containers": containers}}}}  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([pool, deployment]))
    proc = kubeconform(schemas, bad)
    assert proc.returncode != 0 and "Invalid: 2" in proc.stdout, proc.stdout + proc.stderr
