"""kube-score (built and cached by hack/build-binaries.sh) on the rendered chart and on deploy/.

What it reports and we keep is recorded here with the reason; anything new fails. A finding that goes
away (say, the chart gains a NetworkPolicy) is fine.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.tools import tool
from tests.unit.test_chart import CUSTOM_VALUES, helm, template_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

KEPT = {
    "(operator) CPU limit is not set": "a CPU limit throttles the reconcile and poll loops under a burst; "
    "the request is set and a limit is the user's choice (resources value)",
    "(operator) Ephemeral Storage limit is not set": "the operator writes only a small /tmp emptyDir",
    "(operator) Ephemeral Storage request is not set": "the operator writes only a small /tmp emptyDir",
    "(operator) ImagePullPolicy is not set to Always": "deploy/ pins a tag; IfNotPresent is the kubelet default "
    "and kustomize overlays set the image",
    "Container has the same readiness and liveness probe": "both are Kopf's health endpoint: ready means alive "
    "for a controller with no traffic to serve",
    "Deployment does not have a host podAntiAffinity set": "one active replica by design (Recreate, or the "
    "Lease elector with --leader-elect)",
    "No matching PodDisruptionBudget was found": "a single replica: a PDB would only block node drains",
    "The pod does not have a matching NetworkPolicy": "the operator needs the apiserver and every user's "
    "broker, whose addresses only the pool specs know",
    "The pod does not have a matching egress NetworkPolicy": "ingress (/metrics) is closed by default; egress "
    "must reach every broker a pool names, so the broker destination policy (--broker-allow/--broker-deny) "
    "guards it, and networkPolicy.egress narrows it where the brokers' ranges are known",
}


def findings(paths: list[Path]) -> set[str]:
    proc = subprocess.run(
        [str(tool("kube-score")), "score", *map(str, paths), "--output-format", "ci"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "[OK]" in proc.stdout, f"kube-score judged nothing:\n{proc.stderr}{proc.stdout}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))]
    return {line.split(": ", 1)[1] for line in lines}


@pytest.mark.parametrize(
    "extra", [pytest.param((), id="default"), pytest.param(("-f", str(CUSTOM_VALUES)), id="custom")]
)
def test_chart_passes_kube_score(extra: tuple[str, ...], tmp_path: Path) -> None:
    rendered = tmp_path / "chart.yaml"
    rendered.write_text(helm(*template_args(*extra)).stdout)
    new = findings([rendered]) - set(KEPT)
    assert not new, f"kube-score found (fix them, or record why not in KEPT): {sorted(new)}"


def test_deploy_passes_kube_score() -> None:
    files = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert files
    new = findings(files) - set(KEPT)
    assert not new, f"kube-score found (fix them, or record why not in KEPT): {sorted(new)}"
