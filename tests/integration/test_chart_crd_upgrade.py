"""Issue 27: `helm upgrade` upgrades the chart's CRDs, and `helm uninstall` leaves them and the pools.

The cluster is shared and its celeryfleet.io CRDs serve every session, so the chart installed here
carries the same generated CRDs (api.crdgen) under a group of its own. Version 2 of the chart adds
a spec field with a default: before the upgrade the apiserver refuses it, after it a stored pool
reads it defaulted and a new pool keeps it.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.api import crdgen
from tests.support.cluster import ROOT, Cluster
from tests.support.tools import tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHART = ROOT / "charts" / "celery-fleet"
NEW_FIELD = "upgradeProbe"
# The last chart that shipped its CRDs in crds/ (installed once by Helm, never upgraded, not owned).
CRDS_DIR_CHART_COMMIT = "d4e400222d56de1ce3f83274303890df9f8279d3"


def helm(cluster: Cluster, *args: str) -> str:
    proc = subprocess.run(
        [str(tool("helm")), "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}"
    return proc.stdout


def moved_to(crd: dict[str, Any], group: str) -> dict[str, Any]:
    """`crd` under `group`, with no short name or category shared with the session's CRDs."""
    crd = copy.deepcopy(crd)
    names = crd["spec"]["names"]
    crd["metadata"]["name"] = f"{names['plural']}.{group}"
    crd["spec"]["group"] = group
    names["shortNames"] = [f"{group.split('.')[0]}{names['shortNames'][0]}"]
    names.pop("categories", None)
    return crd


def old_chart(dest: Path, group: str) -> Path:
    """The chart as it was with crds/ (from git history), its CRDs moved to `group`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", CRDS_DIR_CHART_COMMIT, "charts/celery-fleet"],
        capture_output=True,
        check=True,
    ).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    chart = dest / "charts" / "celery-fleet"
    for path in sorted((chart / "crds").glob("*.yaml")):
        path.write_text(yaml.safe_dump(moved_to(yaml.safe_load(path.read_text()), group), sort_keys=False))
    return chart


def chart_copy(dest: Path, group: str, version: str, *, new_field: bool) -> Path:
    """The chart with its generated CRD templates moved to `group` (and, with `new_field`, one more field)."""
    shutil.copytree(CHART, dest)
    for name, generated in crdgen.generate_crds().items():
        crd = moved_to(generated, group)
        if new_field and name == crdgen.POOL_FILE:
            spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            spec["properties"][NEW_FIELD] = {"description": "Added by version 2.", "type": "string", "default": "on"}
        (dest / crdgen.CHART_CRD_DIR.relative_to("charts/celery-fleet") / name).write_text(
            crdgen.render_chart_template(crd)
        )
    chart = yaml.safe_load((dest / "Chart.yaml").read_text())
    (dest / "Chart.yaml").write_text(yaml.safe_dump({**chart, "version": version}))
    return dest


@pytest.fixture
def group(cluster: Cluster) -> Iterator[str]:
    group = f"t{uuid.uuid4().hex[:8]}.celeryfleet.io"
    yield group
    for plural in ("celeryworkerpools", "celerybeats"):
        cluster.kubectl("delete", "crd", f"{plural}.{group}", "--wait=false", check=False)


def pool(group: str, name: str, **extra: Any) -> str:
    body = yaml.safe_load((ROOT / "deploy" / "samples" / "pool-minimal.yaml").read_text())
    body["apiVersion"] = f"{group}/v1alpha1"
    body["metadata"]["name"] = name
    body["spec"].update(extra)
    return json.dumps(body)


def spec_of(cluster: Cluster, group: str, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", f"celeryworkerpools.{group}", name, "-n", namespace, "-o", "json").stdout
    spec: dict[str, Any] = json.loads(out)["spec"]
    return spec


def test_helm_upgrade_upgrades_the_crds_and_uninstall_keeps_them_and_the_pools(
    cluster: Cluster, namespace: str, group: str, tmp_path: Path
) -> None:
    release = f"crd-{uuid.uuid4().hex[:6]}"
    v1 = chart_copy(tmp_path / "v1", group, "0.1.0", new_field=False)
    v2 = chart_copy(tmp_path / "v2", group, "0.2.0", new_field=True)
    crd = f"celeryworkerpools.{group}"
    try:
        helm(cluster, "install", release, str(v1), "-n", namespace, "--set", "replicaCount=1")
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pool(group, "before"))
        # Version 1 does not know the field: kubectl's strict field validation refuses it.
        refused = cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=pool(group, "refused", **{NEW_FIELD: "x"}), check=False
        )
        assert refused.returncode != 0 and f'unknown field "spec.{NEW_FIELD}"' in refused.stderr, refused.stderr

        helm(cluster, "upgrade", release, str(v2), "-n", namespace, "--set", "replicaCount=1")
        wait_for(
            lambda: NEW_FIELD in cluster.kubectl("get", "crd", crd, "-o", "json").stdout,
            timeout=30, message="the upgraded CRD",
        )  # fmt: skip
        # A stored pool reads the new default; a new pool keeps the field it sets.
        assert spec_of(cluster, group, namespace, "before")[NEW_FIELD] == "on"
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pool(group, "after", **{NEW_FIELD: "set"}))
        assert spec_of(cluster, group, namespace, "after")[NEW_FIELD] == "set"
        managed = json.loads(cluster.kubectl("get", "crd", crd, "-o", "json").stdout)["metadata"]
        assert managed["labels"]["helm.sh/chart"] == "celery-fleet-0.2.0"
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, "--wait")
    # helm.sh/resource-policy: keep: the CRDs stay, so do the pools (and their workers).
    cluster.kubectl("get", "crd", crd, f"celerybeats.{group}")
    names = cluster.kubectl("get", f"celeryworkerpools.{group}", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(n.rsplit("/", 1)[-1] for n in names) == ["after", "before"]


def test_upgrade_from_the_chart_with_crds_dir_after_the_documented_adoption(
    cluster: Cluster, namespace: str, group: str, tmp_path: Path
) -> None:
    """docs/upgrading.md: CRDs that the old chart's crds/ installed are adopted, then upgraded by Helm."""
    release = f"old-{uuid.uuid4().hex[:6]}"
    crds = [f"celeryworkerpools.{group}", f"celerybeats.{group}"]
    helm(cluster, "install", release, str(old_chart(tmp_path / "old", group)), "-n", namespace,
         "--set", "replicaCount=1")  # fmt: skip
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c}" for c in crds))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pool(group, "before"))
    new = chart_copy(tmp_path / "new", group, "0.2.0", new_field=True)
    try:
        # Without adoption Helm refuses to take over objects it did not create.
        refused = subprocess.run(
            [str(tool("helm")), "--kubeconfig", str(cluster.kubeconfig), "upgrade", release, str(new), "-n", namespace],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr
        for crd in crds:  # the commands of docs/upgrading.md
            cluster.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            cluster.kubectl("annotate", "crd", crd, f"meta.helm.sh/release-name={release}",
                            f"meta.helm.sh/release-namespace={namespace}", "--overwrite")  # fmt: skip
        helm(cluster, "upgrade", release, str(new), "-n", namespace, "--set", "replicaCount=1")
        assert spec_of(cluster, group, namespace, "before")[NEW_FIELD] == "on"
        annotations = json.loads(cluster.kubectl("get", "crd", crds[0], "-o", "json").stdout)["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, "--wait")
    cluster.kubectl("get", "crd", *crds)
    assert cluster.kubectl("get", f"celeryworkerpools.{group}", "before", "-n", namespace, "-o", "name").stdout
