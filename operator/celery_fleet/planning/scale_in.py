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

The scale-in itself is a small protocol recorded on the pods (annotation ``celeryfleet.io/scale-in``,
see docs/scale-in.md): :func:`begin` (choose, mark ``draining``, drain), :func:`finish` (after the
census of the drained candidates: mark ``drained`` with cost -1000 those that hold nothing, lower
``spec.replicas`` past them only), :func:`release` (demand returned, or a process that does not own
the marks found them: queues back, marks off) and :func:`strays` (a live worker consuming none of
its queues with no mark). Each returns :class:`Steps`; the caller writes marks before it acts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from celery_fleet.planning.ownership import controller_of, is_controlled_by

__all__ = [
    "DELETION_COST_ANNOTATION",
    "SCALE_IN_ANNOTATION",
    "SCALE_IN_LABEL",
    "Mark",
    "Phase",
    "RemovalPlan",
    "Steps",
    "TierPod",
    "TierWorkers",
    "WorkerReport",
    "begin",
    "finish",
    "hostname",
    "owned_pods",
    "plan_removal",
    "read_mark",
    "release",
    "strays",
    "write_mark",
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
    def holds(self) -> bool:
        """Busy, or holding ETA tasks: removing it requeues them (and forgets revokes): kept like busy."""
        return self.busy or (self.ready and self.answered and self.remote_control and self.scheduled > 0)

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

    @property
    def holding(self) -> tuple[WorkerReport, ...]:
        return tuple(w for w in self.workers if w.holds)

    @property
    def covered(self) -> bool:
        """Every live worker that could hold a task answered: what they hold is all that is held."""
        asked = [w for w in self.workers if w.ready]
        return bool(asked) and all(w.answered and w.remote_control for w in asked)

    @property
    def hostage(self) -> int:
        """Messages reserved behind running tasks (early ack, default prefetch): only that worker can run
        them, when its task ends; new pods never get them, so they are no demand for new pods."""
        return sum(w.reserved for w in self.workers if w.ready and w.answered and w.active > 0)

    @property
    def held(self) -> int:
        """Every message the answering workers hold (running, reserved, scheduled)."""
        return sum(w.active + w.reserved + w.scheduled for w in self.workers if w.ready and w.answered)

    def summary(self) -> str:
        busy, silent = self.busy, self.unanswered
        text = f"kept {len(busy)} busy worker{'s' if len(busy) != 1 else ''}"
        eta = len(self.holding) - len(busy)
        if eta:
            text += f" and {eta} holding ETA tasks"
        if silent:
            text += f" ({len(silent)} not answering: {', '.join(w.pod for w in silent[:5])})"
        return text


@dataclass(frozen=True)
class RemovalPlan:
    """Which pods go when a tier goes from ``len(costs)`` live pods to ``keep``."""

    remove: tuple[str, ...]  # in the order they go; drained before spec.replicas drops
    costs: Mapping[str, int]  # pod -> pod-deletion-cost, for every live pod
    busy_removed: tuple[str, ...] = ()  # only when the tier allows removing busy workers


def _rank(w: WorkerReport, marked: frozenset[str] = frozenset()) -> tuple[int, int, int, int, str]:
    # Not-ready pods go first (the ReplicaSet controller takes them first anyway), then idle ones
    # (already drained ones first: they consume nothing), then ETA holders, then (only if allowed)
    # busy ones holding the least.
    if not w.ready:
        group = 0
    elif not w.holds:
        group = 1
    elif not w.busy:
        group = 2
    else:
        group = 3
    return (group, 0 if w.pod in marked else 1, w.held, w.scheduled, w.pod)


def plan_removal(workers: Sequence[WorkerReport], keep: int, marked: Iterable[str] = ()) -> RemovalPlan:
    """Choose ``len(workers) - keep`` pods to remove, idle first, and the costs that make it so.

    ``keep`` comes from ``decide``, which never goes below the busy count unless the tier allows
    it; when it does, the busy pods holding the least go first and are named in ``busy_removed``.
    """
    drained = frozenset(marked)
    ordered = sorted(workers, key=lambda w: _rank(w, drained))
    count = max(0, len(ordered) - max(0, keep))
    remove = ordered[:count]
    gone = {w.pod for w in remove}
    costs: dict[str, int] = {}
    for w in ordered:
        if w.pod in gone:
            costs[w.pod] = COST_REMOVE
        elif w.holds:
            costs[w.pod] = COST_BUSY + min(w.held + w.scheduled, COST_BUSY_SPAN)
        else:
            costs[w.pod] = COST_IDLE
    return RemovalPlan(
        remove=tuple(w.pod for w in remove),
        costs=costs,
        busy_removed=tuple(w.pod for w in remove if w.busy),
    )


# -- the protocol recorded on the pods -----------------------------------------------------------------

SCALE_IN_ANNOTATION = "celeryfleet.io/scale-in"
# The same state as a label, so a process that starts finds every marked pod of a pool in one LIST.
SCALE_IN_LABEL = "celeryfleet.io/scale-in"
# Anyone who may patch pods can write the annotation: read at most this much of it.
MAX_MARK_BYTES = 2048


class Phase(StrEnum):
    DRAINING = "draining"  # written before cancel_consumer: it may consume nothing from now on
    DRAINED = "drained"  # written (with cost -1000) before spec.replicas drops: asked after the drain, holds nothing


@dataclass(frozen=True)
class Mark:
    state: Phase
    at: float  # unix time it was written
    queues: tuple[str, ...]  # what the drain took away: what undoing it gives back
    uid: str  # the pod's uid: a mark copied to another pod is nobody's

    def value(self) -> str:
        return json.dumps({"state": self.state.value, "at": round(self.at, 3), "queues": list(self.queues),
                           "uid": self.uid}, separators=(",", ":"))  # fmt: skip


def read_mark(pod: Mapping[str, Any]) -> Mark | None:
    """The pod's scale-in mark; None when absent. A malformed one reads as a draining mark with no queues
    (its pod may consume nothing: undoing it gives back the tier's queues)."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(SCALE_IN_ANNOTATION)
    if raw is None:
        return None
    uid = str(meta.get("uid", ""))
    try:
        if not isinstance(raw, str) or len(raw) > MAX_MARK_BYTES:
            raise ValueError("too long")
        data = json.loads(raw)
        queues = data["queues"]
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            raise ValueError("queues")
        return Mark(Phase(data["state"]), float(data["at"]), tuple(queues), str(data["uid"]))
    except (ValueError, TypeError, KeyError):
        return Mark(Phase.DRAINING, 0.0, (), uid)


def write_mark(mark: Mark | None) -> dict[str, Any]:
    """The merge patch that records (or, None, removes) a mark."""
    if mark is None:
        return {"metadata": {"annotations": {SCALE_IN_ANNOTATION: None}, "labels": {SCALE_IN_LABEL: None}}}
    return {
        "metadata": {"annotations": {SCALE_IN_ANNOTATION: mark.value()}, "labels": {SCALE_IN_LABEL: mark.state.value}}
    }


@dataclass(frozen=True)
class TierPod:
    """A live pod of a tier as listed: its name, uid, mark and deletion cost."""

    name: str
    uid: str = ""
    mark: Mark | None = None
    cost: int | None = None

    @property
    def marked(self) -> bool:
        return self.mark is not None and self.mark.uid == self.uid


def tier_pod(pod: Mapping[str, Any]) -> TierPod:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION)
    try:
        cost = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        cost = None
    return TierPod(str(meta.get("name", "")), str(meta.get("uid", "")), read_mark(pod), cost)


@dataclass(frozen=True)
class Steps:
    """What to do next, in this order: marks (written before what they announce), drain, undrain,
    unmark (after the queues are back), costs, then spec.replicas."""

    mark: Mapping[str, Mark] = field(default_factory=dict)
    drain: tuple[str, ...] = ()
    undrain: tuple[str, ...] = ()
    unmark: tuple[str, ...] = ()
    costs: Mapping[str, int] = field(default_factory=dict)
    replicas: int | None = None
    kept: tuple[str, ...] = ()  # drained candidates found holding work: they stay drained until idle
    note: str = ""


def begin(pods: Sequence[TierPod], census: TierWorkers, keep: int, queues: Sequence[str], now: float) -> Steps:
    """Choose who goes to reach ``keep`` pods (idle first, already drained ones first), mark them
    ``draining`` and drain them; marked pods no longer chosen get their queues back."""
    by_name = {p.name: p for p in pods}
    marked = [p.name for p in pods if p.marked]
    plan = plan_removal(census.workers, keep, marked)
    chosen = [p for p in plan.remove if p in by_name]
    marks = {
        p: Mark(Phase.DRAINING, now, tuple(queues), by_name[p].uid)
        for p in chosen
        if not (by_name[p].marked and (m := by_name[p].mark) is not None and m.state is Phase.DRAINING)
    }
    # Not-ready pods (not connected: not asked) consume nothing yet; draining them is harmless and
    # covers one that connects in between. Sent again to marked ones: a restarted worker consumes again.
    undo = [p for p in marked if p not in chosen]
    return Steps(mark=marks, drain=tuple(chosen), undrain=tuple(undo), unmark=tuple(undo))


def finish(
    pods: Sequence[TierPod],
    chosen: Sequence[str],
    after: Mapping[str, WorkerReport],
    current: int,
    desired: int,
    queues: Sequence[str],
    now: float,
    before: TierWorkers,
    *,
    remove_busy: bool = False,
) -> Steps:
    """After the census of the drained candidates: those that hold nothing are marked ``drained`` with
    cost -1000 and spec.replicas drops past them only; the others stay drained (marked ``draining``).
    ``remove_busy``: the tier removes busy workers (scaleInBusyWorkers: Remove, above replicas.max)."""
    by_name = {p.name: p for p in pods}
    confirmed: list[str] = []
    kept: list[str] = []
    for pod in chosen:
        w = after.get(pod)
        if w is None or pod not in by_name:
            kept.append(pod)
        elif remove_busy or not w.ready or not w.remote_control or not w.holds:
            # Not connected (holds nothing), remote control off (cannot be asked: today's rule), or idle.
            confirmed.append(pod)
        else:
            kept.append(pod)
    going = confirmed[: max(0, current - desired)]
    kept += confirmed[len(going) :]
    costs = dict(plan_removal(before.workers, len(before.workers)).costs)
    for pod in kept:
        costs[pod] = max(costs.get(pod, COST_IDLE), COST_IDLE)
    for pod in going:
        costs[pod] = COST_REMOVE
    marks = {p: Mark(Phase.DRAINED, now, tuple(queues), by_name[p].uid) for p in going}
    replicas = current - len(going) if going else None
    note = ""
    silent = [p for p in kept if (w := after.get(p)) is None or (w.ready and not w.answered)]
    busy = [p for p in kept if p not in silent and (w := after.get(p)) is not None and w.holds]
    if busy:
        note = f"drained {', '.join(busy[:5])} took work during the census: kept drained until idle"
    if silent:
        note += ("; " if note else "") + f"drained {', '.join(silent[:5])} did not answer: kept drained"
    return Steps(mark=marks, costs=costs, replicas=replicas, kept=tuple(kept), note=note)


def release(pods: Sequence[TierPod], *, replicas: int | None = None) -> Steps:
    """Undo every mark: queues back, then marks off. With ``replicas`` (a process that does not own the
    marks): a ``drained`` pod with cost -1000 while the tier has more pods than replicas is on its
    way out (the ReplicaSet controller deletes it next) and is left alone."""
    leaving = len(pods) - replicas if replicas is not None else 0
    undo: list[str] = []
    stale: list[str] = []
    for p in pods:
        if p.mark is None:
            continue
        if not p.marked:
            stale.append(p.name)  # another pod's mark: nothing of ours was drained
            continue
        if leaving > 0 and p.mark.state is Phase.DRAINED and p.cost == COST_REMOVE:
            leaving -= 1
            continue
        undo.append(p.name)
    return Steps(undrain=tuple(undo), unmark=tuple(undo + stale))


def strays(pods: Sequence[TierPod], census: TierWorkers, queues: Sequence[str]) -> tuple[str, ...]:
    """Live workers that consume none of the tier's queues and carry no mark (a drain whose mark was
    lost, or a confirmation after our deadline): they get their queues back."""
    unmarked = {p.name for p in pods if not p.marked}
    wanted = set(queues)
    return tuple(
        w.pod
        for w in census.workers
        if w.pod in unmarked and w.answered and w.queues is not None and not (w.queues & wanted)
    )
