"""The conflict check with another autoscaler (planning.scaler_conflict), as a named table."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.planning.scaler_conflict import (
    KEDA_PAUSED,
    OtherScaler,
    conflict_condition,
    conflicts,
    other_scaler,
)

TIERS = {"high": "shop-high", "low": "shop-low"}


def hpa(name: str, target: str, *, kind: str = "Deployment", api: str = "apps/v1", owner: str | None = None) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if owner:
        meta["ownerReferences"] = [{"kind": "ScaledObject", "name": owner, "apiVersion": "keda.sh/v1alpha1"}]
    return {
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {"scaleTargetRef": {"apiVersion": api, "kind": kind, "name": target}},
    }


def scaled_object(name: str, target: str, *, paused: str | None = None) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if paused is not None:
        meta["annotations"] = {KEDA_PAUSED: paused}
    # KEDA's defaults: kind Deployment, apiVersion apps/v1 when left out.
    return {"kind": "ScaledObject", "metadata": meta, "spec": {"scaleTargetRef": {"name": target}}}


@pytest.mark.parametrize(
    ("bodies", "expected"),
    [
        pytest.param([], {}, id="none"),
        pytest.param([hpa("h", "shop-high")], {"high": ["HorizontalPodAutoscaler h"]}, id="hpa-on-a-tier"),
        pytest.param([hpa("h", "shop-medium")], {}, id="hpa-on-a-deployment-of-no-tier"),
        pytest.param([hpa("h", "shop")], {}, id="hpa-on-the-pool-name-alone"),
        pytest.param([hpa("h", "shop-high", kind="StatefulSet")], {}, id="hpa-on-a-statefulset-of-that-name"),
        pytest.param([hpa("h", "shop-high", api="argoproj.io/v1alpha1", kind="Deployment")], {},
                     id="hpa-on-another-group"),
        pytest.param([scaled_object("so", "shop-low")], {"low": ["ScaledObject so"]}, id="scaledobject-defaults"),
        pytest.param([scaled_object("so", "shop-low", paused="true")], {}, id="paused-scaledobject"),
        pytest.param([scaled_object("so", "shop-low", paused="false")], {"low": ["ScaledObject so"]},
                     id="scaledobject-paused-false"),
        pytest.param([scaled_object("so", "shop-low"), hpa("keda-hpa-so", "shop-low", owner="so")],
                     {"low": ["ScaledObject so"]}, id="keda-hpa-named-by-its-scaledobject"),
        pytest.param([hpa("keda-hpa-so", "shop-low", owner="so")], {"low": ["HorizontalPodAutoscaler keda-hpa-so"]},
                     id="keda-hpa-without-scaledobject-seen"),
        pytest.param([hpa("b", "shop-high"), hpa("a", "shop-high"), scaled_object("so", "shop-low")],
                     {"high": ["HorizontalPodAutoscaler a", "HorizontalPodAutoscaler b"], "low": ["ScaledObject so"]},
                     id="several-sorted"),
    ],
)  # fmt: skip
def test_conflicts(bodies: list[Any], expected: dict[str, list[str]]) -> None:
    scalers = [s for s in (other_scaler(b) for b in bodies) if s is not None]
    found = conflicts(TIERS, scalers)
    assert {tier: [f"{s.kind} {s.name}" for s in ss] for tier, ss in found.items()} == expected


def test_a_scaler_without_a_target_is_ignored() -> None:
    assert other_scaler({"kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"}, "spec": {}}) is None


@pytest.mark.parametrize(
    ("found", "shown", "expected"),
    [
        pytest.param({}, False, None, id="never-conflicted-carries-no-condition"),
        pytest.param({}, True, ("False", "NoOtherAutoscaler"), id="cleared"),
        pytest.param({"high": [OtherScaler("HorizontalPodAutoscaler", "h", "Deployment", "shop-high")]}, False,
                     ("True", "OtherAutoscaler"), id="raised"),
    ],
)  # fmt: skip
def test_condition(found: dict[str, list[OtherScaler]], shown: bool, expected: tuple[str, str] | None) -> None:
    update = conflict_condition("shop", found, shown=shown)
    assert (None if update is None else (update.status, update.reason)) == expected


def test_message_names_the_object_the_deployment_and_the_fix() -> None:
    found = {"high": [OtherScaler("HorizontalPodAutoscaler", "legacy", "Deployment", "shop-high")]}
    update = conflict_condition("shop", found, shown=False)
    assert update is not None
    assert "tier high (Deployment shop-high) is also scaled by HorizontalPodAutoscaler legacy" in update.message
    assert "holds those tiers' replicas" in update.message
    assert "Delete the other autoscaler" in update.message
