"""Another autoscaler on a tier's Deployment (pure): an HPA or a KEDA ScaledObject whose
scaleTargetRef names `<pool>-<tier>` would write spec.replicas against the operator.

The operator does not fight it: while one targets a tier, the operator holds that tier's replicas
(neither the autoscaler nor the reconciler writes them) and says so on the pool, naming the object
and the fix. KEDA's admission webhook refuses two ScaledObjects on one target; here the HPA or
ScaledObject may come first, so holding (not refusing) is what is left to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_fleet.planning.conditions import ConditionUpdate

CONDITION = "ScalerConflict"
REASON = "OtherAutoscaler"
CLEARED_REASON = "NoOtherAutoscaler"
# KEDA's pause annotation: a ScaledObject paused this way writes no replicas (KEDA removes its HPA).
KEDA_PAUSED = "autoscaling.keda.sh/paused"


@dataclass(frozen=True)
class OtherScaler:
    """An HPA or ScaledObject, as much of it as the check reads."""

    kind: str  # HorizontalPodAutoscaler or ScaledObject
    name: str
    target_kind: str
    target_name: str
    target_api_version: str = "apps/v1"
    owner_scaled_object: str | None = None  # an HPA that KEDA made for a ScaledObject
    paused: bool = False


def other_scaler(body: Mapping[str, Any]) -> OtherScaler | None:
    """Read an HPA (autoscaling/v2) or ScaledObject (keda.sh/v1alpha1) body; None if it names no target."""
    kind = str(body.get("kind", ""))
    meta = body.get("metadata") or {}
    target = (body.get("spec") or {}).get("scaleTargetRef") or {}
    name = target.get("name")
    if not isinstance(name, str) or not name:
        return None
    owner = next(
        (o.get("name") for o in meta.get("ownerReferences") or [] if o.get("kind") == "ScaledObject"),
        None,
    )
    annotations = meta.get("annotations") or {}
    return OtherScaler(
        kind=kind,
        name=str(meta.get("name", "")),
        # A ScaledObject's target defaults to an apps/v1 Deployment (KEDA's defaults).
        target_kind=str(target.get("kind") or "Deployment"),
        target_name=name,
        target_api_version=str(target.get("apiVersion") or "apps/v1"),
        owner_scaled_object=owner,
        paused=kind == "ScaledObject" and str(annotations.get(KEDA_PAUSED, "")).lower() == "true",
    )


def conflicts(tier_deployments: Mapping[str, str], scalers: Iterable[OtherScaler]) -> dict[str, list[OtherScaler]]:
    """Tier -> the other autoscalers that target its Deployment (`tier_deployments`: tier -> name).

    An HPA that KEDA made for a ScaledObject seen here is left out: the ScaledObject is what to name.
    A paused ScaledObject writes nothing and is no conflict (the migration guide pauses it first).
    """
    by_target = {dep: tier for tier, dep in tier_deployments.items()}
    found: dict[str, list[OtherScaler]] = {}
    scalers = list(scalers)
    scaled_objects = {s.name for s in scalers if s.kind == "ScaledObject"}
    for s in sorted(scalers, key=lambda s: (s.kind, s.name)):
        if s.target_kind != "Deployment" or s.target_api_version.split("/")[0] != "apps":
            continue
        if s.paused or (s.owner_scaled_object is not None and s.owner_scaled_object in scaled_objects):
            continue
        tier = by_target.get(s.target_name)
        if tier is not None:
            found.setdefault(tier, []).append(s)
    return found


def conflict_message(pool: str, found: Mapping[str, Sequence[OtherScaler]]) -> str:
    parts = []
    for tier in sorted(found):
        names = ", ".join(f"{s.kind} {s.name}" for s in found[tier])
        parts.append(f"tier {tier} (Deployment {found[tier][0].target_name}) is also scaled by {names}")
    return (
        "; ".join(parts) + ". The operator holds those tiers' replicas while it lasts and writes none of them. "
        f'Delete the other autoscaler (or pause a ScaledObject: {KEDA_PAUSED}="true"), or remove the tier '
        f"from pool {pool}."
    )


def conflict_condition(pool: str, found: Mapping[str, Sequence[OtherScaler]], *, shown: bool) -> ConditionUpdate | None:
    """The ScalerConflict condition; None when there is no conflict and the condition was never shown
    (a pool that never had one does not carry it)."""
    if found:
        return ConditionUpdate(CONDITION, "True", REASON, conflict_message(pool, found))
    if shown:
        return ConditionUpdate(CONDITION, "False", CLEARED_REASON, "no HPA or ScaledObject targets a tier")
    return None
