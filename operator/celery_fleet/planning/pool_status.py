"""What a CeleryWorkerPool's status should say, from what was observed (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from celery_fleet.api.models import CeleryWorkerPoolStatus, TierStatus
from celery_fleet.planning.conditions import ConditionUpdate, blocked, progressing, settled


@dataclass(frozen=True)
class TierObservation:
    """A tier Deployment as the watch cache last saw it (None fields: not created yet)."""

    name: str
    exists: bool
    spec_replicas: int = 0
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    observed_generation: int = 0
    generation: int = 0


@dataclass(frozen=True)
class TierScaling:
    desired_replicas: int | None = None
    queue_depth: int | None = None
    in_flight: int | None = None
    last_scale_time: str | None = None
    last_scale_reason: str | None = None
    scheduled: int | None = None
    busy_workers: int | None = None
    stale_unacked: int | None = None
    orphaned: int | None = None
    limited_by: str | None = None


@dataclass(frozen=True)
class Problem:
    """Why the object cannot be reconciled; goes to the conditions unchanged (see conditions.blocked)."""

    reason: str
    message: str


@dataclass(frozen=True)
class PoolStatusInput:
    generation: int
    tiers: Sequence[TierObservation]
    scaling: Mapping[str, TierScaling] = field(default_factory=dict)
    problem: Problem | None = None
    paused: bool = False


def tier_rolled_out(t: TierObservation) -> bool:
    return (
        t.exists
        and t.observed_generation >= t.generation
        and t.updated_replicas >= t.spec_replicas
        and t.available_replicas >= t.spec_replicas
        and t.replicas == t.spec_replicas
        and t.ready_replicas >= t.spec_replicas
    )


def pool_status(inp: PoolStatusInput) -> tuple[dict[str, Any], list[ConditionUpdate]]:
    """The status body (conditions left empty) and the condition updates for it."""
    tiers = []
    for t in inp.tiers:
        # TierScaling's fields are TierStatus's (same names): the autoscaler's record goes in as it is.
        scaling = asdict(inp.scaling.get(t.name, TierScaling()))
        if scaling["desired_replicas"] is None:
            scaling["desired_replicas"] = t.spec_replicas
        tiers.append(TierStatus(name=t.name, replicas=t.replicas, ready_replicas=t.ready_replicas, **scaling))
    body = CeleryWorkerPoolStatus(
        observed_generation=inp.generation,
        tiers=tiers,
        replicas=sum(t.replicas for t in tiers),
        desired_replicas=sum(t.desired_replicas for t in tiers),
        queued=sum(t.queue_depth or 0 for t in tiers),
        # "7/8": ready pods over pods the tiers should have, for the Ready printer column.
        ready=f"{sum(t.ready_replicas for t in inp.tiers)}/{sum(t.spec_replicas for t in inp.tiers)}",
    ).to_json()
    if inp.problem is not None:
        return body, blocked(inp.problem.reason, inp.problem.message)

    missing = [t.name for t in inp.tiers if not t.exists]
    rolling = [t for t in inp.tiers if t.exists and not tier_rolled_out(t)]
    if missing or rolling:
        parts = []
        if missing:
            parts.append("creating " + ", ".join(missing))
        if rolling:
            parts.append(
                "waiting for " + ", ".join(f"{t.name} ({t.ready_replicas}/{t.spec_replicas} ready)" for t in rolling)
            )
        return body, progressing("RollingOut", "; ".join(parts))
    message = f"{len(inp.tiers)} tiers, {sum(t.ready_replicas for t in inp.tiers)} workers ready"
    if inp.paused:
        message += " (paused: changes are not applied)"
    return body, settled("Paused" if inp.paused else "AllTiersReady", message)


def observe_deployment(tier: str, deployment: Mapping[str, Any] | None) -> TierObservation:
    if deployment is None:
        return TierObservation(name=tier, exists=False)
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    return TierObservation(
        name=tier,
        exists=True,
        spec_replicas=int(spec.get("replicas", 1)),
        replicas=int(status.get("replicas", 0)),
        ready_replicas=int(status.get("readyReplicas", 0)),
        updated_replicas=int(status.get("updatedReplicas", 0)),
        available_replicas=int(status.get("availableReplicas", 0)),
        observed_generation=int(status.get("observedGeneration", 0)),
        generation=int(meta.get("generation", 0)),
    )


QUEUES_CONSUMED = "QueuesConsumed"


def queues_consumed(waiting: Mapping[str, int], checked: Sequence[str]) -> ConditionUpdate:
    """Whether messages wait in queues no tier consumes (`waiting`: queue -> depth, of the `checked` ones).

    Celery sends tasks without a route to its default queue `celery`: when no tier lists it they
    never run, and nothing else would say so.
    """
    waiting = {q: n for q, n in waiting.items() if n > 0}
    if waiting:
        queues = ", ".join(f"{q} ({n} messages)" for q, n in sorted(waiting.items()))
        return ConditionUpdate(
            QUEUES_CONSUMED,
            "False",
            "UnconsumedQueue",
            f"messages wait in queues no tier consumes: {queues}; tasks sent without a route go to Celery's "
            "default queue celery: add the queue to a tier's spec.tiers[].queues, or route the tasks to a tier's "
            "queues (task_routes)",
        )
    if checked:
        return ConditionUpdate(
            QUEUES_CONSUMED, "True", "NothingWaiting", f"no message waits in {', '.join(sorted(checked))}, "
            "which no tier consumes"
        )  # fmt: skip
    return ConditionUpdate(QUEUES_CONSUMED, "True", "DefaultQueueConsumed", "a tier consumes Celery's default queue")
