"""Scale-in's act path: ask a tier's workers what they hold (a census through Celery remote
control), choose the idle pods to go, set pod-deletion-cost so the ReplicaSet controller removes
them, drain them (cancel_consumer) before spec.replicas is lowered, and let any still running
after the scale-in consume again. The choice itself is pure (`planning.scale_in`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import Tier
from celery_fleet.brokers.control import ControlError, ControlTarget, WorkerControl
from celery_fleet.handlers.autoscaler.signals import EventNotes
from celery_fleet.handlers.cache import ObjKey
from celery_fleet.kube.client import ApiError, Kube, resource_path
from celery_fleet.kube.events import ObjectRef
from celery_fleet.planning.scale_in import (
    DELETION_COST_ANNOTATION,
    RemovalPlan,
    TierWorkers,
    WorkerReport,
    owned_pods,
    plan_removal,
)
from celery_fleet.planning.scaling import Decision, TierObservation
from celery_fleet.planning.workload import tier_selector_labels

log = logging.getLogger(__name__)

# A tier held by its busy workers is asked again at most this often while its queue readings
# stay the same (a census is a broadcast through the user's broker: per decision, not per poll).
CENSUS_REUSE_SECONDS = 5.0
# After lowering spec.replicas, how long the pods chosen to go may stay before their workers are
# told to consume again (the ReplicaSet controller kept them, or demand brought replicas back).
DRAIN_CHECK_SECONDS = 20.0
# A tier never has more pods than replicas.max allows; more listed pods are somebody else's doing.
MAX_CENSUS_PODS = 1000


@dataclass(frozen=True)
class _Census:
    workers: TierWorkers
    observation: TierObservation
    pods: tuple[str, ...]


@dataclass(frozen=True)
class Removal:
    plan: RemovalPlan
    target: ControlTarget
    queues: tuple[str, ...]
    live: Mapping[str, Mapping[str, Any]]  # pod name -> pod, as listed for the census
    deployment_uid: str  # the tier Deployment whose pods these are


@dataclass(frozen=True)
class Census:
    """What one round of asking found, per asked tier."""

    workers: dict[str, TierWorkers]
    live: dict[str, dict[str, dict[str, Any]]]  # tier -> pod name -> pod
    notes: list[Coroutine[Any, Any, None]]
    deployments: Mapping[str, str]  # tier -> its Deployment's uid
    # Tier -> why some of its workers cannot be asked (no remote-control mailbox), for asked tiers.
    remote_control_off: dict[str, str] = field(default_factory=dict)


class ScaleIn:
    def __init__(
        self,
        kube: Kube,
        control: WorkerControl,
        clock: Callable[[], float],
        notes: EventNotes,
    ) -> None:
        self.kube = kube
        self.control = control
        self.clock = clock
        self.notes = notes
        self._censuses: dict[tuple[ObjKey, str], _Census] = {}

    def reusable_censuses(
        self, key: ObjKey, tiers: list[str], observations: Mapping[str, TierObservation], now: float
    ) -> dict[str, TierWorkers] | None:
        out: dict[str, TierWorkers] = {}
        for tier in tiers:
            c = self._censuses.get((key, tier))
            if c is None or now - c.workers.at >= CENSUS_REUSE_SECONDS or c.observation != observations.get(tier):
                return None
            out[tier] = c.workers
        return out

    def forget_census(self, key: ObjKey, tier: str) -> None:
        self._censuses.pop((key, tier), None)

    def forget(self, key: ObjKey) -> None:
        """A deleted pool: drop every census of its tiers."""
        for k in [k for k in self._censuses if k[0] == key]:
            del self._censuses[k]

    def tier_pods(self, namespace: str, pool: str, tier: str, deployment_uid: str) -> dict[str, dict[str, Any]]:
        """The tier's live pods: those of a ReplicaSet its Deployment controls, whatever else has its labels."""
        selector = ",".join(f"{k}={v}" for k, v in tier_selector_labels(pool, tier).items())
        # The ReplicaSets carry the pod template's labels: one small LIST, then ownership by uid.
        replicasets = self.kube.list("apps/v1", "ReplicaSet", namespace, label_selector=selector)
        pods = owned_pods(self.kube.list("v1", "Pod", namespace, label_selector=selector), replicasets, deployment_uid)
        live = {
            str(p["metadata"]["name"]): dict(p)
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        }
        return dict(sorted(live.items())[:MAX_CENSUS_PODS])

    async def census(
        self,
        key: ObjKey,
        ref: ObjectRef,
        target: ControlTarget,
        observations: Mapping[str, TierObservation],
        asking: list[str],
        deployments: Mapping[str, str],
    ) -> Census | None:
        """Ask the workers of each tier in `asking` (`deployments`: tier -> its Deployment's uid);
        None when a tier's pods cannot be listed."""
        namespace, name = key
        out = Census({}, {}, [], deployments)
        for tier in asking:
            if not deployments.get(tier):
                return None  # no Deployment of ours yet: nothing to ask, nothing to remove
            try:
                pods = await asyncio.to_thread(self.tier_pods, namespace, name, tier, deployments[tier])
            except ApiError as err:
                # Without the pods nobody can be asked: no scale-in this time (the next poll retries).
                log.warning("pool %s/%s: cannot list the pods of tier %s: %s", namespace, name, tier, err)
                return None
            ready = [p for p, pod in pods.items() if pod_ready(pod)]
            started, sent = self.clock(), self.control.broadcasts
            try:
                reports = await self.control.census(target, ready)
                metrics.WORKER_CENSUSES.labels("answered").inc()
            except ControlError as err:
                # Our own control path failed (not a worker's silence): like remote control off,
                # nobody can be asked, so today's behaviour, with a Warning below.
                log.warning("pool %s/%s: cannot ask the workers of tier %s: %s", namespace, name, tier, err)
                reports = {p: WorkerReport(p, answered=False, remote_control=False) for p in ready}
                metrics.WORKER_CENSUSES.labels("failed").inc()
            metrics.WORKER_CENSUS_SECONDS.observe(self.clock() - started)
            metrics.REMOTE_CONTROL_BROADCASTS.inc(self.control.broadcasts - sent)
            workers = TierWorkers(
                at=self.clock(),
                workers=tuple(reports.get(p, WorkerReport(p, ready=False)) for p in pods),
            )
            out.workers[tier] = workers
            out.live[tier] = pods
            self._censuses[(key, tier)] = _Census(workers, observations[tier], tuple(pods))
            mute = workers.without_remote_control
            if mute:
                message = (
                    f"tier {tier}: {len(mute)} worker(s) cannot be asked what they run (no remote-control "
                    f"mailbox, or the broker refused the command: {', '.join(w.pod for w in mute[:5])}); "
                    "scale-in cannot protect busy workers, so the tier scales from queue depth alone as if "
                    "they were idle. Enable worker_enable_remote_control (and keep the default "
                    "control_exchange), or set a replicas.min that covers your long tasks."
                )
                out.remote_control_off[tier] = message
                out.notes.extend(self.notes.once(key, ref, tier, "RemoteControlOff", message, "remote-control-off",
                                                 "Warning"))  # fmt: skip
        return out

    @staticmethod
    def removals(
        decisions: tuple[Decision, ...], census: Census, target: ControlTarget, tiers: Mapping[str, Tier]
    ) -> dict[str, Removal]:
        """The pods to remove from each asked tier that the decisions lower."""
        removals: dict[str, Removal] = {}
        for d in decisions:
            if d.tier in census.workers and d.current is not None and d.desired < d.current:
                workers_ = census.workers[d.tier].workers
                going = max(0, min(d.current - d.desired, len(workers_) - d.desired))
                plan = plan_removal(workers_, len(workers_) - going)
                removals[d.tier] = Removal(
                    plan, target, tuple(tiers[d.tier].queues), census.live[d.tier], census.deployments[d.tier]
                )
        return removals

    def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        self.kube.request(
            "PATCH",
            resource_path("v1", "Pod", namespace, pod),
            body={"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}},
            content_type="application/merge-patch+json",
        )

    async def prepare_removal(self, key: ObjKey, tier: str, removal: Removal) -> set[str]:
        """Deletion costs on the tier's pods, then drain the chosen ones; returns the drained pods."""
        namespace, name = key
        changes = [
            (pod, cost)
            for pod, cost in removal.plan.costs.items()
            if ((removal.live.get(pod, {}).get("metadata") or {}).get("annotations") or {}).get(
                DELETION_COST_ANNOTATION
            )
            != str(cost)
        ]
        results = await asyncio.gather(
            *(asyncio.to_thread(self.set_deletion_cost, namespace, pod, cost) for pod, cost in changes),
            return_exceptions=True,
        )
        failed = [pod for (pod, _), r in zip(changes, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            # The ReplicaSet controller may then take other pods: drain nobody, rely on warm shutdown.
            log.warning("pool %s/%s: could not set pod-deletion-cost on %s", namespace, name, ", ".join(failed))
            return set()
        victims = [p for p in removal.plan.remove if pod_ready(removal.live.get(p, {}))]
        if not victims:
            return set()
        sent = self.control.broadcasts
        try:
            drained = await self.control.cancel_consumer(removal.target, victims, removal.queues)
        except ControlError as err:
            log.warning("pool %s/%s: could not drain %s: %s", namespace, name, ", ".join(victims), err)
            drained = set()
        metrics.REMOTE_CONTROL_BROADCASTS.inc(self.control.broadcasts - sent)
        if drained:
            log.info(
                "pool %s/%s: tier %s: drained %s before scale-in", namespace, name, tier, ", ".join(sorted(drained))
            )
        return drained

    async def undrain(self, key: ObjKey, tier: str, removal: Removal, pods: set[str], why: str) -> None:
        namespace, name = key
        try:
            await self.control.add_consumer(removal.target, sorted(pods), removal.queues)
        except ControlError as err:
            log.warning("pool %s/%s: could not resume %s: %s", namespace, name, ", ".join(sorted(pods)), err)
            return
        log.info("pool %s/%s: tier %s: %s consume again (%s)", namespace, name, tier, ", ".join(sorted(pods)), why)

    async def check_drained(self, key: ObjKey, tier: str, removal: Removal, drained: set[str]) -> None:
        """Drained pods must go; any still live after DRAIN_CHECK_SECONDS consumes again."""
        namespace, name = key
        deadline = self.clock() + DRAIN_CHECK_SECONDS
        left = set(drained)
        try:
            while left:
                await asyncio.sleep(1.0)
                pods = await asyncio.to_thread(self.tier_pods, namespace, name, tier, removal.deployment_uid)
                left &= set(pods)
                if left and self.clock() >= deadline:
                    await self.undrain(key, tier, removal, left, "still running after the scale-in")
                    return
        except ApiError as err:
            log.warning("pool %s/%s: cannot check drained pods of tier %s: %s", namespace, name, tier, err)
            await self.undrain(key, tier, removal, left, "their removal could not be checked")
        except Exception:
            log.exception("pool %s/%s: checking drained pods of tier %s failed", namespace, name, tier)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions if isinstance(c, dict))
