"""What a tier's workers hold, and which of its pods go when it shrinks. (pure)

Under Celery's default early ack a running task is in neither its queue nor Redis's ``unacked``
hash, so the broker cannot tell a busy worker from an idle one. Before a tier shrinks (or the
pool budget takes replicas from it) the autoscaler asks the tier's workers through Celery remote
control what they hold; :class:`TierWorkers` is that answer, one :class:`WorkerReport` per live
pod, and :func:`plan_removal` turns it into the pods to remove (idle ones first), the
``controller.kubernetes.io/pod-deletion-cost`` of every pod (so the ReplicaSet controller removes
exactly those) and the pods to drain (``cancel_consumer``) before ``spec.replicas`` drops.

A worker that does not answer in time counts as busy: it may be stuck in a long task, or
stopped, and removing it could kill work. A worker with no remote-control mailbox at all (the app
set ``worker_enable_remote_control = False``, or another ``control_exchange``) cannot be asked:
it counts as idle, as before this existed, and the tier says so once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_fleet.planning.ownership import controller_of, is_controlled_by

__all__ = [
    "DELETION_COST_ANNOTATION",
    "RemovalPlan",
    "TierWorkers",
    "WorkerReport",
    "hostname",
    "owned_pods",
    "plan_removal",
]

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# The ReplicaSet controller removes the pods with the lowest cost first (after unscheduled,
# pending and not-ready pods). Chosen pods get the lowest, busy pods the highest.
COST_REMOVE = -1000
COST_IDLE = 0
COST_BUSY = 1000
# Busy pods are ranked among themselves by what they hold, up to this many tasks.
COST_BUSY_SPAN = 1000


def hostname(pod: str) -> str:
    """A tier pod's Celery node name: the worker runs with ``--hostname celery@$(POD_NAME)``."""
    return f"celery@{pod}"


def owned_pods(
    pods: Iterable[Mapping[str, Any]], replicasets: Iterable[Mapping[str, Any]], deployment_uid: str
) -> list[Mapping[str, Any]]:
    """The pods of a tier Deployment: controlled by a ReplicaSet that the Deployment (by uid) controls.

    Labels do not count: anyone who may create pods in the namespace can copy a tier's labels, and
    such a pod must never be annotated, drained or counted as one of the tier's workers.
    """
    ours = {
        str(rs["metadata"]["uid"])
        for rs in replicasets
        if is_controlled_by(rs, deployment_uid) and (rs.get("metadata") or {}).get("uid")
    }
    out = []
    for pod in pods:
        ref = controller_of(pod)
        if ref is not None and ref.get("kind") == "ReplicaSet" and ref.get("uid") in ours:
            out.append(pod)
    return out


@dataclass(frozen=True)
class WorkerReport:
    """What one pod's worker holds, as it answered (or did not)."""

    pod: str
    ready: bool = True  # the pod's Ready condition: connected to the broker
    answered: bool = True
    # False: the worker has no remote-control mailbox (remote control off); it cannot be asked.
    remote_control: bool = True
    active: int = 0  # running tasks (early-acked ones are in no Redis key at all)
    reserved: int = 0  # prefetched, not started
    scheduled: int = 0  # ETA / countdown tasks held until due: scheduled work, not demand
    # The queues it consumes (``inspect active_queues``); None: not asked or not answered.
    queues: frozenset[str] | None = None

    @property
    def busy(self) -> bool:
        if not self.ready:
            return False  # not connected to the broker: it cannot hold a task
        if not self.remote_control:
            return False  # cannot be asked: today's behaviour (the tier warns once)
        return not self.answered or self.active > 0 or self.reserved > 0

    @property
    def held(self) -> int:
        return self.active + self.reserved

    def describe(self) -> str:
        if not self.ready:
            return f"{self.pod} not ready"
        if not self.remote_control:
            return f"{self.pod} has remote control off"
        if not self.answered:
            return f"{self.pod} did not answer"
        return f"{self.pod} runs {self.active}, reserved {self.reserved}, scheduled {self.scheduled}"


@dataclass(frozen=True)
class TierWorkers:
    """The answers of a tier's live pods, taken at ``at`` (the autoscaler's clock)."""

    at: float
    workers: tuple[WorkerReport, ...]

    @property
    def busy(self) -> tuple[WorkerReport, ...]:
        return tuple(w for w in self.workers if w.busy)

    @property
    def unanswered(self) -> tuple[WorkerReport, ...]:
        return tuple(w for w in self.workers if w.ready and w.remote_control and not w.answered)

    @property
    def without_remote_control(self) -> tuple[WorkerReport, ...]:
        return tuple(w for w in self.workers if w.ready and not w.remote_control)

    @property
    def scheduled(self) -> int:
        return sum(w.scheduled for w in self.workers if w.answered)

    def summary(self) -> str:
        busy, silent = self.busy, self.unanswered
        text = f"kept {len(busy)} busy worker{'s' if len(busy) != 1 else ''}"
        if silent:
            text += f" ({len(silent)} not answering: {', '.join(w.pod for w in silent[:5])})"
        return text


@dataclass(frozen=True)
class RemovalPlan:
    """Which pods go when a tier goes from ``len(costs)`` live pods to ``keep``."""

    remove: tuple[str, ...]  # in the order they go; drained before spec.replicas drops
    costs: Mapping[str, int]  # pod -> pod-deletion-cost, for every live pod
    busy_removed: tuple[str, ...] = ()  # only when the tier allows removing busy workers


def _rank(w: WorkerReport) -> tuple[int, int, int, str]:
    # Not-ready pods go first (the ReplicaSet controller takes them first anyway), then idle ones
    # holding the fewest scheduled tasks, then (only if allowed) busy ones holding the least.
    if not w.ready:
        group = 0
    elif not w.busy:
        group = 1
    else:
        group = 2
    return (group, w.held, w.scheduled, w.pod)


def plan_removal(workers: Sequence[WorkerReport], keep: int) -> RemovalPlan:
    """Choose ``len(workers) - keep`` pods to remove, idle first, and the costs that make it so.

    ``keep`` comes from ``decide``, which never goes below the busy count unless the tier allows
    it; when it does, the busy pods holding the least go first and are named in ``busy_removed``.
    """
    ordered = sorted(workers, key=_rank)
    count = max(0, len(ordered) - max(0, keep))
    remove = ordered[:count]
    gone = {w.pod for w in remove}
    costs: dict[str, int] = {}
    for w in ordered:
        if w.pod in gone:
            costs[w.pod] = COST_REMOVE
        elif w.busy:
            costs[w.pod] = COST_BUSY + min(w.held, COST_BUSY_SPAN)
        else:
            costs[w.pod] = COST_IDLE
    return RemovalPlan(
        remove=tuple(w.pod for w in remove),
        costs=costs,
        busy_removed=tuple(w.pod for w in remove if w.busy),
    )
