"""The contract between the local cluster's kwok stage and the local runtime: one label, both sides.

kwok leaves readiness of the pods carrying RUN_LABEL to the local runtime (hack/kwok/), and the local
runtime runs exactly those pods; demo manifests set the same label through podLabels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet_localrun.cluster import RUN_LABEL, RUN_LABEL_VALUE, RUN_LABELS, LocalCluster

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "hack" / "kwok" / "pod-run-by-local-runtime.yaml"


def _stage() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(STAGE.read_text()) if d]
    assert doc["kind"] == "Stage"
    return dict(doc)


def test_the_stage_selects_the_label_the_runtime_runs() -> None:
    selector = _stage()["spec"]["selector"]
    assert selector["matchLabels"] == {RUN_LABEL: RUN_LABEL_VALUE} == RUN_LABELS


def test_the_stage_outweighs_kwoks_default_and_writes_no_readiness() -> None:
    spec = _stage()["spec"]
    # kwok's pod-ready (weight 0) matches the same pods; a positive weight makes kwok pick ours.
    assert spec["weight"] > 0
    phases = [e for e in spec["selector"]["matchExpressions"] if e["key"] == ".status.phase"]
    assert phases == [{"key": ".status.phase", "operator": "In", "values": ["Pending"]}]
    (step,) = spec["steps"]
    template = step["patch"]["template"]
    assert step["patch"]["subresource"] == "status" and "phase: Running" in template
    for owned_by_the_runtime in ("type: Ready", "ContainersReady", "containerStatuses"):
        assert owned_by_the_runtime not in template


@pytest.mark.parametrize("manifest", ["pool.yaml", "beat.yaml"])
def test_demo_manifests_carry_the_label(manifest: str) -> None:
    doc = yaml.safe_load((ROOT / "demo" / "manifests" / manifest).read_text())
    assert doc["spec"]["podLabels"] == RUN_LABELS


def _pod(namespace: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"{namespace}/{name}", "labels": labels}}


class ListingCluster(LocalCluster):
    """LocalCluster whose one pod list is canned (no apiserver)."""

    def __init__(self, items: list[dict[str, Any]], namespaces: list[str]) -> None:
        self.namespaces, self.selector, self._passed_over = namespaces, "x=y", set()
        self.items = items
        self.queries: list[Any] = []

    def _call(self, method: str, path: str, body: Any = None, query: Any = None, **_: Any) -> Any:
        self.queries.append((method, path, query))
        return {"items": self.items}


def test_the_runtime_runs_only_labelled_pods_and_names_the_others_once(caplog: pytest.LogCaptureFixture) -> None:
    items = [
        _pod("t1-a", "runs", RUN_LABELS),
        _pod("t1-a", "kwoks", {}),
        _pod("t1-a", "other-value", {RUN_LABEL: "false"}),
        _pod("elsewhere", "out-of-scope", RUN_LABELS),
    ]
    cluster = ListingCluster(items, ["t1-*"])
    with caplog.at_level(logging.WARNING, logger="celery_fleet_localrun.cluster"):
        assert [p["metadata"]["name"] for p in cluster.pods()] == ["runs"]
        assert [p["metadata"]["name"] for p in cluster.pods()] == ["runs"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # once per pod, not per tick
    assert all(RUN_LABEL in w and "podLabels" in w for w in warned)
    assert any("t1-a/kwoks" in w for w in warned) and not any("out-of-scope" in w for w in warned)
    assert cluster.queries == [("GET", "/api/v1/pods", [("labelSelector", "x=y")])] * 2
