"""Scale-in's act path: the protocol of `planning.scale_in`, recorded on the pods.

Ask a tier's workers what they hold (a census through Celery remote control, one absolute deadline,
tiers asked concurrently); choose the pods to go (idle first); mark them ``draining`` on the pod,
then drain them (cancel_consumer); ask the drained candidates again (a task started during the
first census is seen now); mark ``drained`` with pod-deletion-cost -1000 only those that hold
nothing, and lower spec.replicas past them only. A drained candidate found busy stays drained until
it is idle or demand returns. Any process (a restart, a new leader) finds the marks by label and
undoes what it does not own (`resume`). The choices are pure (`planning.scale_in`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import BusyWorkers, Tier
from celery_fleet.brokers.control import ControlError, ControlTarget, WorkerControl
from celery_fleet.handlers.autoscaler.signals import EventNotes
from celery_fleet.handlers.cache import ObjKey
from celery_fleet.kube.client import ApiError, Kube, resource_path
from celery_fleet.kube.events import ObjectRef
from celery_fleet.planning.scale_in import (
    DELETION_COST_ANNOTATION,
    SCALE_IN_LABEL,
    Mark,
    Steps,
    TierPod,
    TierWorkers,
    WorkerReport,
    begin,
    finish,
    owned_pods,
    release,
    strays,
    tier_pod,
    write_mark,
)
from celery_fleet.planning.scaling import Decision, Reason, TierObservation
from celery_fleet.planning.workload import POOL_LABEL, TIER_LABEL, tier_selector_labels

log = logging.getLogger(__name__)

# A tier held by its busy workers is asked again at most this often while its queue readings
# stay the same (a census is a broadcast through the user's broker: per decision, not per poll).
CENSUS_REUSE_SECONDS = 5.0
# One census (all its commands) ends by this deadline, answered or not: silent workers count as busy.
CENSUS_DEADLINE_SECONDS = 2.5
# A control client that overruns its deadline by this much is abandoned: the census is unknown.
CENSUS_GRACE_SECONDS = 1.5
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
    target: ControlTarget
    queues: tuple[str, ...]
    live: Mapping[str, Mapping[str, Any]]  # pod name -> pod, as listed for the census
    deployment_uid: str  # the tier Deployment whose pods these are
    workers: TierWorkers  # the census before the drain
    remove_busy: bool = False  # scaleInBusyWorkers: Remove, or above replicas.max: busy candidates go too

    @property
    def pods(self) -> list[TierPod]:
        return [tier_pod(p) for p in self.live.values()]


@dataclass(frozen=True)
class Census:
    """What one round of asking found, per asked tier."""

    workers: dict[str, TierWorkers]
    live: dict[str, dict[str, dict[str, Any]]]  # tier -> pod name -> pod
    notes: list[Coroutine[Any, Any, None]]
    deployments: Mapping[str, str]  # tier -> its Deployment's uid
    # Tier -> why some of its workers cannot be asked (no remote-control mailbox), for asked tiers.
    remote_control_off: dict[str, str] = field(default_factory=dict)
    # Tier -> why its scale-in is held: the census could not cover it (control path failed, pods
    # unlisted). Unknown is never idle.
    unknown: dict[str, str] = field(default_factory=dict)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions if isinstance(c, dict))


def pod_running(pod: Mapping[str, Any]) -> bool:
    """Its worker may run: a NotReady pod that runs (a worker reconnecting after a broker outage keeps
    its task) is asked, not taken for idle."""
    return pod_ready(pod) or (pod.get("status") or {}).get("phase") == "Running"


class ScaleIn:
    def __init__(
        self,
        kube: Kube,
        control: WorkerControl,
        clock: Callable[[], float],
        notes: EventNotes,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.control = control
        self.clock = clock
        self.wall = wall  # the marks' time: read by other processes
        self.notes = notes
        self._censuses: dict[tuple[ObjKey, str], _Census] = {}
        # Marks this process wrote and still manages (busy drained candidates kept until idle); a mark
        # not in here was left by another process (or an earlier life of this one): `resume` undoes it.
        self._owned: dict[tuple[ObjKey, str], set[str]] = {}
        # One round or one resume of a pool at a time: a resume never undoes what a round just chose.
        self._locks: dict[ObjKey, asyncio.Lock] = {}

    def _lock(self, key: ObjKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- what is kept between polls
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
        for k in [k for k in self._owned if k[0] == key]:
            del self._owned[k]
        self._locks.pop(key, None)

    def owned(self, key: ObjKey, tier: str) -> set[str]:
        return set(self._owned.get((key, tier), ()))

    # -- the apiserver
    def tier_pods(self, namespace: str, pool: str, tier: str, deployment_uid: str) -> dict[str, dict[str, Any]]:
        """The tier's live pods: those of a ReplicaSet its Deployment controls, whatever else has its labels.
        With an empty ``tier``: the pool's pods that carry a scale-in mark (one LIST, by label)."""
        if not tier:
            selector = f"{POOL_LABEL}={pool},{SCALE_IN_LABEL}"
            return {str(p["metadata"]["name"]): dict(p) for p in self.kube.list("v1", "Pod", namespace,
                                                                                  label_selector=selector)}  # fmt: skip
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

    def set_deletion_cost(self, namespace: str, pod: str, cost: int, mark: Mark | bool | None = False) -> None:
        """One merge patch: the pod's deletion cost and (unless ``mark`` is False) its scale-in mark."""
        body: dict[str, Any] = write_mark(mark) if mark is not False else {"metadata": {}}  # type: ignore[arg-type]
        if cost is not None:
            body["metadata"].setdefault("annotations", {})[DELETION_COST_ANNOTATION] = str(cost)
        self.kube.request(
            "PATCH", resource_path("v1", "Pod", namespace, pod), body=body, content_type="application/merge-patch+json"
        )

    async def _patch(self, namespace: str, patches: Mapping[str, tuple[int | None, Mark | bool | None]]) -> list[str]:
        """Patch pods concurrently; returns those that failed."""
        names = list(patches)
        results = await asyncio.gather(
            *(asyncio.to_thread(self.set_deletion_cost, namespace, p, *patches[p]) for p in names),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        return [p for p, r in zip(names, results, strict=True) if isinstance(r, BaseException)]

    # -- remote control
    async def ask(self, target: ControlTarget, pods: Sequence[str]) -> dict[str, WorkerReport]:
        """One census with one absolute deadline; a control client that overruns it is abandoned
        (ControlError: unknown, never idle)."""
        if not pods:
            return {}
        deadline = time.monotonic() + CENSUS_DEADLINE_SECONDS
        sent = self.control.broadcasts
        try:
            return await asyncio.wait_for(
                self.control.census(target, list(pods), deadline=deadline),
                CENSUS_DEADLINE_SECONDS + CENSUS_GRACE_SECONDS,
            )
        except TimeoutError:
            raise ControlError("the census overran its deadline") from None
        finally:
            metrics.REMOTE_CONTROL_BROADCASTS.inc(self.control.broadcasts - sent)

    async def _consumers(
        self, command: str, target: ControlTarget, pods: Sequence[str], queues: Sequence[str]
    ) -> set[str]:
        if not pods:
            return set()
        deadline = time.monotonic() + CENSUS_DEADLINE_SECONDS
        sent = self.control.broadcasts
        call = self.control.cancel_consumer if command == "cancel" else self.control.add_consumer
        try:
            return await asyncio.wait_for(call(target, list(pods), list(queues), deadline=deadline),
                                          CENSUS_DEADLINE_SECONDS + CENSUS_GRACE_SECONDS)  # fmt: skip
        except TimeoutError:
            raise ControlError(f"{command} overran its deadline") from None
        finally:
            metrics.REMOTE_CONTROL_BROADCASTS.inc(self.control.broadcasts - sent)

    async def census(
        self,
        key: ObjKey,
        ref: ObjectRef,
        target: ControlTarget,
        observations: Mapping[str, TierObservation],
        asking: list[str],
        deployments: Mapping[str, str],
    ) -> Census:
        """Ask the workers of each tier in `asking` (`deployments`: tier -> its Deployment's uid), all
        tiers at once. A tier that could not be covered is in ``unknown`` (and not in ``workers``)."""
        out = Census({}, {}, [], deployments)
        await asyncio.gather(*(self._census_tier(key, ref, target, observations, tier, out) for tier in asking))
        return out

    async def _census_tier(
        self, key: ObjKey, ref: ObjectRef, target: ControlTarget, observations: Mapping[str, TierObservation],
        tier: str, out: Census,
    ) -> None:  # fmt: skip
        namespace, name = key
        if not out.deployments.get(tier):
            return  # no Deployment of ours yet: nothing to ask, nothing to remove
        try:
            pods = await asyncio.to_thread(self.tier_pods, namespace, name, tier, out.deployments[tier])
        except ApiError as err:
            # Without the pods nobody can be asked: no scale-in this time (the next poll retries).
            out.unknown[tier] = f"tier {tier}: scale-in held: its pods cannot be listed ({err.status} {err.reason})"
            return
        asked = [p for p, pod in pods.items() if pod_running(pod)]
        started = self.clock()
        try:
            reports = await self.ask(target, asked)
            metrics.WORKER_CENSUSES.labels("answered").inc()
        except ControlError as err:
            # Our own control path failed: nothing is known, so every asked worker counts as busy.
            out.unknown[tier] = f"tier {tier}: scale-in held: the workers cannot be asked ({err})"
            reports = {p: WorkerReport(p, answered=False) for p in asked}
            metrics.WORKER_CENSUSES.labels("failed").inc()
        metrics.WORKER_CENSUS_SECONDS.observe(self.clock() - started)
        workers = TierWorkers(at=self.clock(), workers=tuple(_report(p, pods[p], reports) for p in pods))
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

    @staticmethod
    def removals(
        decisions: tuple[Decision, ...], census: Census, target: ControlTarget, tiers: Mapping[str, Tier]
    ) -> dict[str, Removal]:
        """What the protocol needs for each asked tier that the decisions lower."""
        return {
            d.tier: Removal(
                target,
                tuple(tiers[d.tier].queues),
                census.live[d.tier],
                census.deployments[d.tier],
                census.workers[d.tier],
                tiers[d.tier].autoscaling.scale_in_busy_workers is BusyWorkers.REMOVE
                or d.reason is Reason.ABOVE_MAXIMUM,
            )
            for d in decisions
            if d.tier in census.workers and d.current is not None and d.desired < d.current
        }

    # -- the protocol
    async def remove(self, key: ObjKey, tier: str, removal: Removal, d: Decision) -> tuple[int | None, str, set[str]]:
        """Choose, mark, drain, ask again, mark drained (cost -1000): returns the replicas to write
        (None: nobody goes this time), what the scale's message adds and the pods marked to go."""
        async with self._lock(key):
            return await self._remove(key, tier, removal, d)

    async def _remove(self, key: ObjKey, tier: str, removal: Removal, d: Decision) -> tuple[int | None, str, set[str]]:
        namespace, name = key
        assert d.current is not None
        pods = removal.pods
        workers = removal.workers.workers
        going = max(0, min(d.current - d.desired, len(workers) - d.desired))
        steps = begin(pods, removal.workers, len(workers) - going, removal.queues, self.wall())
        owned = self._owned.setdefault((key, tier), set())
        if steps.undrain:
            await self._undo(key, tier, removal.target, removal.queues, steps.undrain, steps.unmark, "no longer chosen")
        chosen = list(steps.drain)
        if not chosen:
            return None, "", set()
        owned.update(chosen)  # before the marks exist: a later resume never takes them for another's
        failed = await self._patch(namespace, {p: (None, m) for p, m in steps.mark.items()})
        owned.difference_update(failed)
        if failed:
            # Nothing was drained yet: take the marks back (a mark without a drain is undone by resume anyway).
            log.warning("pool %s/%s: could not mark %s for scale-in", namespace, name, ", ".join(failed))
            await self._undo(
                key, tier, removal.target, removal.queues, (), [p for p in steps.mark if p not in failed], ""
            )
            return None, "the pods could not be marked", set()
        asked = [p for p in chosen if pod_running(removal.live.get(p, {}))]
        try:
            await self._consumers("cancel", removal.target, asked, removal.queues)
            log.info("pool %s/%s: tier %s: drained %s before scale-in", namespace, name, tier, ", ".join(chosen))
            # Asked after the drain: a task started during the first census is seen now.
            reports = await self.ask(removal.target, asked)
        except ControlError as err:
            await self._undo(key, tier, removal.target, removal.queues, chosen, chosen, f"the drain failed: {err}")
            return None, f"the drain failed ({err})", set()
        after = {p: _report(p, removal.live.get(p, {}), reports) for p in chosen}
        fin = finish(
            pods, chosen, after, d.current, d.desired, removal.queues, self.wall(), removal.workers,
            remove_busy=removal.remove_busy,
        )  # fmt: skip
        costs = dict(fin.costs)
        patches: dict[str, tuple[int | None, Mark | bool | None]] = {}
        for p, cost in costs.items():
            old = ((removal.live.get(p, {}).get("metadata") or {}).get("annotations") or {}).get(
                DELETION_COST_ANNOTATION
            )
            if p in fin.mark or old != str(cost):
                patches[p] = (cost, fin.mark.get(p, False))
        failed = await self._patch(namespace, patches)
        if failed:
            # The ReplicaSet controller might take other pods than the confirmed ones: undo the whole round.
            log.warning("pool %s/%s: could not set pod-deletion-cost on %s", namespace, name, ", ".join(failed))
            await self._undo(key, tier, removal.target, removal.queues, chosen, chosen, "deletion costs not written")
            return None, "deletion costs could not be written", set()
        if fin.kept:
            log.info("pool %s/%s: tier %s: %s", namespace, name, tier, fin.note)
        return fin.replicas, fin.note, set(fin.mark)

    async def _undo(
        self, key: ObjKey, tier: str, target: ControlTarget, queues: Sequence[str], undrain: Sequence[str],
        unmark: Sequence[str], why: str,
    ) -> None:  # fmt: skip
        """Queues back first, then the marks off: a crash in between leaves a mark that resume undoes."""
        namespace, name = key
        if undrain:
            try:
                await self._consumers("add", target, list(undrain), queues)
            except ControlError as err:
                log.warning("pool %s/%s: could not resume %s: %s", namespace, name, ", ".join(undrain), err)
                return  # the marks stay: the next resume tries again
            log.info("pool %s/%s: tier %s: %s consume again (%s)", namespace, name, tier, ", ".join(undrain), why)
        if unmark:
            await self._patch(namespace, {p: (None, None) for p in unmark})
        owned = self._owned.get((key, tier))
        if owned is not None:
            owned.difference_update(unmark)

    async def release(
        self, key: ObjKey, tier: str, target: ControlTarget, queues: Sequence[str], deployment_uid: str, why: str,
        replicas: int | None = None, only_unowned: bool = False,
    ) -> None:  # fmt: skip
        """Undo the tier's marks (all, or with ``only_unowned`` those another process left)."""
        namespace, name = key
        try:
            live = await asyncio.to_thread(self.tier_pods, namespace, name, tier, deployment_uid)
        except ApiError as err:
            log.warning("pool %s/%s: cannot list the pods of tier %s: %s", namespace, name, tier, err)
            return
        pods = [tier_pod(p) for p in live.values()]
        steps: Steps = release(pods, replicas=replicas)
        mine = self._owned.get((key, tier))
        if mine is not None:
            mine.intersection_update(live)  # gone pods are done
        owned = self.owned(key, tier) if only_unowned else set()
        undrain = [p for p in steps.undrain if p not in owned]
        unmark = [p for p in steps.unmark if p not in owned]
        # What each drain took away, as recorded, and what the tier consumes now.
        taken = [q for p in pods if p.name in undrain and p.mark is not None for q in p.mark.queues]
        if unmark:
            await self._undo(key, tier, target, tuple(dict.fromkeys([*queues, *taken])), undrain, unmark, why)

    async def resume(
        self, key: ObjKey, target: ControlTarget, tiers: Mapping[str, tuple[str, int | None, tuple[str, ...]]]
    ) -> None:
        """Marks this process does not own (a dead predecessor's, a late confirmation): finished (a
        drained pod on its way out is left alone) or undone. ``tiers``: tier -> (Deployment uid,
        spec.replicas, queues). One LIST by label when nothing is marked."""
        async with self._lock(key):
            await self._resume(key, target, tiers)

    async def _resume(
        self, key: ObjKey, target: ControlTarget, tiers: Mapping[str, tuple[str, int | None, tuple[str, ...]]]
    ) -> None:
        namespace, name = key
        try:
            marked = await asyncio.to_thread(self.tier_pods, namespace, name, "", "")
        except ApiError as err:
            log.warning("pool %s/%s: cannot list marked pods: %s", namespace, name, err)
            return
        found: set[str] = set()
        for pod in marked.values():
            tier = str(((pod.get("metadata") or {}).get("labels") or {}).get(TIER_LABEL, ""))
            if tier in tiers and pod["metadata"]["name"] not in self.owned(key, tier):
                found.add(tier)
        for tier in sorted(found):
            uid, replicas, queues = tiers[tier]
            await self.release(key, tier, target, queues, uid, "a scale-in left by another operator process",
                               replicas=replicas, only_unowned=True)  # fmt: skip

    async def give_back(self, key: ObjKey, tier: str, target: ControlTarget, census: TierWorkers,
                        live: Mapping[str, Mapping[str, Any]], queues: Sequence[str]) -> None:  # fmt: skip
        """Live workers of the tier that consume none of its queues and carry no mark get them back."""
        lost = strays([tier_pod(p) for p in live.values()], census, queues)
        if lost:
            await self._undo(key, tier, target, queues, lost, (), "they consumed none of the tier's queues")

    async def check_drained(
        self, key: ObjKey, tier: str, target: ControlTarget, queues: Sequence[str], deployment_uid: str,
        drained: set[str],
    ) -> None:  # fmt: skip
        """Drained pods must go; any still live after DRAIN_CHECK_SECONDS consumes again."""
        namespace, name = key
        deadline = self.clock() + DRAIN_CHECK_SECONDS
        left = set(drained)
        try:
            while left:
                await asyncio.sleep(1.0)
                pods = await asyncio.to_thread(self.tier_pods, namespace, name, tier, deployment_uid)
                owned = self._owned.get((key, tier))
                if owned is not None:
                    owned.difference_update(left - set(pods))
                left &= set(pods)
                if left and self.clock() >= deadline:
                    await self._undo(
                        key, tier, target, queues, sorted(left), sorted(left), "still running after the scale-in"
                    )
                    return
        except ApiError as err:
            log.warning("pool %s/%s: cannot check drained pods of tier %s: %s", namespace, name, tier, err)
            await self._undo(
                key, tier, target, queues, sorted(left), sorted(left), "their removal could not be checked"
            )
        except Exception:
            log.exception("pool %s/%s: checking drained pods of tier %s failed", namespace, name, tier)


def _report(pod: str, body: Mapping[str, Any], reports: Mapping[str, WorkerReport]) -> WorkerReport:
    """A live pod's report: not asked (not running) = not connected, holds nothing. A NotReady pod
    whose worker has no mailbox yet is booting (never connected), not a worker with remote control off."""
    found = reports.get(pod)
    if found is None:
        return WorkerReport(pod, ready=False)
    if not pod_ready(body) and not found.answered and not found.remote_control:
        return WorkerReport(pod, ready=False)
    return found
