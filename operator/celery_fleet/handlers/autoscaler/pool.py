"""One pool per poll: observe its tiers, decide (pure, `planning.scaling.decide`), and act: the
scale subresource, Events, metrics and a status refresh through the pool's work queue.

A decision that would lower a tier (or raise it on in-flight work that may be ETA tasks) first
asks the tier's workers (:mod:`.scale_in`) in a background task, one per pool at a time, and
decides again with their answer and the freshest observation; the poll loop never waits for it,
and scale-ups of every tier (the asked ones included) go on meanwhile. Every RESUME_SECONDS (and on
the first poll of a pool, i.e. at start) the pool's pods are searched for scale-in marks another
process left, which are finished or undone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import CeleryWorkerPoolSpec
from celery_fleet.brokers.control import ControlTarget
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, QueueRef
from celery_fleet.handlers.autoscaler.scale_in import Census, Removal, ScaleIn
from celery_fleet.handlers.autoscaler.signals import EventNotes, PoolSeries
from celery_fleet.handlers.cache import FleetCache, ObjKey, PoolRuntime
from celery_fleet.handlers.pool_reconciler import OWN_POLL_SLOW_REASON, pool_ref, utcnow
from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.events import EventPoster, ObjectRef, post_event
from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scaling import (
    Decision,
    Direction,
    Observation,
    ReadFailure,
    Reason,
    TierObservation,
    decide,
    with_desired,
)
from celery_fleet.planning.tier_scaling import applied_replicas, tier_scaling, with_skipped_polls
from celery_fleet.planning.workload import tier_child_name

log = logging.getLogger(__name__)

# Queue depth and in-flight change on every poll under load; writing them to status that
# often would cost an apiserver write per pool per second, so only decisions and broker
# state changes refresh status at once, and plain depth changes at most this often.
STATUS_REFRESH_SECONDS = 5.0
# A pool whose inputs have not changed since a decision that changed nothing is not decided
# again (idle fleets are the common case), but at least this often all the same.
FULL_DECIDE_SECONDS = 10.0
# How often a pool's pods are searched (one LIST by label) for scale-in marks no process owns.
RESUME_SECONDS = 60.0


@dataclass
class _Inputs:
    """The last observation of a pool: what a scale-in decides on once its census is back."""

    body: Mapping[str, Any]
    spec: CeleryWorkerPoolSpec
    observations: Mapping[str, TierObservation]
    tier_problem: tuple[str, str] | None


@dataclass
class _Steady:
    """The inputs of the last decision that changed nothing (every tier held at its current count)."""

    signature: tuple[Any, ...]  # generation, observations, current replicas by tier
    current: dict[str, int | None]
    decided_at: float
    skipped_at: float | None = None
    # The reading revision and cache version the signature was last found equal at: while the pool's
    # queues are unchanged since that revision and the version holds, it is not even observed.
    seen: tuple[int, int | None] | None = None
    # The reading's per-queue change map then: a later reading with the very same map changed nothing.
    changes: Mapping[QueueRef, int] | None = None


def _shown(runtime: PoolRuntime) -> tuple[Any, ...]:
    """What a pool's status shows of the autoscaler's work."""
    return tuple(sorted(runtime.scaling.items())), runtime.broker_problem


class PoolScaler:
    def __init__(
        self,
        kube: Kube,
        cache: FleetCache,
        refresh_status: Callable[[ObjKey], None],
        clock: Callable[[], float],
        series: PoolSeries,
        scale_in: ScaleIn,
        notes: EventNotes,
        max_replicas: Callable[[ObjKey, str], int],
        events: EventPoster | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.refresh_status = refresh_status
        self.clock = clock
        self.series = series
        self.scale_in = scale_in
        self.notes = notes
        self.max_replicas = max_replicas
        self._last_status: dict[ObjKey, float] = {}
        self.events = events or EventPoster(kube)
        self._shown: dict[ObjKey, tuple[Any, ...]] = {}  # the autoscaler's part of the last status refresh
        self._steady: dict[ObjKey, _Steady] = {}
        self._scale_ins: dict[ObjKey, asyncio.Task[None]] = {}
        self._asking: dict[ObjKey, frozenset[str]] = {}  # the tiers a running scale-in works on
        self._inputs: dict[ObjKey, _Inputs] = {}
        self._resumed: dict[ObjKey, float] = {}
        self._resumes: dict[ObjKey, asyncio.Task[None]] = {}

    def forget(self, key: ObjKey) -> None:
        """A deleted pool: nothing of it is kept (its censuses and notes included)."""
        self._last_status.pop(key, None)
        self._shown.pop(key, None)
        self._steady.pop(key, None)
        self._inputs.pop(key, None)
        self._resumed.pop(key, None)
        self.scale_in.forget(key)
        self.notes.forget(key)

    def scale_pool(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        spec: CeleryWorkerPoolSpec,
        refs: dict[str, list[QueueRef]],
        result: DepthReading | BrokerError,
    ) -> list[Coroutine[Any, Any, None]]:
        """Observe, decide and settle one pool; returns the API calls to make (scales, Events)."""
        now = self.clock()
        if now - self._resumed.get(key, float("-inf")) >= RESUME_SECONDS and key not in self._resumes:
            # At start (a pool's first poll) and now and then: marks no process of ours owns.
            self._resumed[key] = now
            task = asyncio.get_running_loop().create_task(self._resume(key, body, spec))
            self._resumes[key] = task
            task.add_done_callback(lambda _t, k=key: self._resumes.pop(k, None))  # type: ignore[misc]
        steady = self._steady.get(key)
        version = self.cache.version(key)
        seen = None if isinstance(result, BrokerError) or result.revision is None else (result.revision, version)
        if (
            seen is not None
            and steady is not None
            and steady.seen is not None
            and steady.seen[1] == version
            and now - steady.decided_at < FULL_DECIDE_SECONDS
            and not isinstance(result, BrokerError)
            and (
                result.changed_at is steady.changes
                or all(result.unchanged_since(steady.seen[0], tier_refs) for tier_refs in refs.values())
            )
        ):
            # Its queues read as before and neither the pool nor its children changed.
            steady.changes = result.changed_at
            return self._skip(steady, now)
        runtime = self.cache.runtime[key]
        namespace, name = key
        observations: dict[str, TierObservation]
        broker_problem: tuple[str, str] | None = None
        tier_problem: tuple[str, str] | None = None  # the broker answered, some tiers' queues did not
        try:
            if isinstance(result, BrokerError):
                raise result
            reading = result
            observations = {tier: reading.observe(tier_refs) for tier, tier_refs in refs.items()}
            self.series.record_depth(namespace, name, refs, reading)
            for tier, o in observations.items():
                if isinstance(o, Observation):
                    self.series.set(metrics.STALE_UNACKED, (namespace, name, tier), o.stale_unacked)
            unread = {t: o for t, o in observations.items() if isinstance(o, ReadFailure)}
            if unread:
                # The broker answered, but not for every tier (e.g. WRONGTYPE: a queue name taken by
                # another type of key). Those tiers hold; the pool must say why, as for a dead broker.
                why = "; ".join(f"tier {t}: {o.message}" for t, o in unread.items())
                kind = ErrorKind.RESPONSE_ERROR.value
                tier_problem = (f"Broker{kind}", f"cannot read queue depth of {why}; those tiers are held")
                metrics.BROKER_ERRORS.labels(kind).inc()
        except BrokerError as err:
            failure = err.as_failure()
            observations = {t.name: failure for t in spec.tiers}
            broker_problem = (f"Broker{err.kind.value}", f"cannot read queue depth: {err}; replicas are held")
            metrics.BROKER_ERRORS.labels(err.kind.value).inc()

        # Only Deployments this pool controls: a look-alike with copied labels is never scaled.
        children = self.cache.children_of(key, owner_uid=str(body["metadata"].get("uid", "")))
        current: dict[str, int | None] = {}
        for t in spec.tiers:
            dep = children.get(("Deployment", tier_child_name(name, t.name)))
            current[t.name] = None if dep is None else int((dep.get("spec") or {}).get("replicas", 0))
            seen_tier = observations.get(t.name)
            if dep is not None and t.autoscaling.target_wait_seconds is not None and isinstance(seen_tier, Observation):
                # A wait target measures start-ups (spec raised -> ready) and drains with the ready pods.
                ready = (dep.get("status") or {}).get("readyReplicas") or 0
                observations[t.name] = replace(seen_tier, ready_replicas=int(ready))
        signature = (
            int(body["metadata"].get("generation", 0)),
            tuple(observations.get(t.name) for t in spec.tiers),
            tuple(current.items()),
        )
        if steady is not None and steady.signature == signature and now - steady.decided_at < FULL_DECIDE_SECONDS:
            # Same inputs as a decision that changed nothing: it would decide the same again.
            steady.seen = seen
            steady.changes = None if isinstance(result, BrokerError) else result.changed_at
            return self._skip(steady, now)
        histories = dict(runtime.history)
        if steady is not None:
            # The skipped polls each recommended the steady count: keep that in the stabilization window.
            histories = with_skipped_polls(histories, steady.skipped_at, steady.current)
        decisions = decide(
            spec.tiers,
            observations,
            current,
            histories,
            now=now,
            max_total_replicas=spec.max_total_replicas,
            paused=spec.paused,
        )
        self._inputs[key] = _Inputs(body, spec, observations, tier_problem)
        running = self._asking.get(key)
        if running is not None:
            # The asked tiers' decisions follow from their workers' answer; scale-ups never wait for it.
            free = tuple(
                d for d in decisions
                if not d.asks_workers and (d.tier not in running or d.desired > (d.current or 0))
            )  # fmt: skip
            self._steady.pop(key, None)
            return self._act(key, body, runtime, free, broker_problem, tier_problem) if free else []
        released = [
            d.tier for d in decisions
            if self.scale_in.owned(key, d.tier) and d.recommended is not None and d.current is not None
            and (d.recommended >= d.current or d.desired > d.current)
        ]  # fmt: skip
        if released and broker_problem is None:
            # Demand returned: drained candidates kept for their work get their queues back.
            self._start(key, frozenset(released), self._release(key, body, spec, released))
            self._steady.pop(key, None)
            others = tuple(
                d for d in decisions
                if not d.asks_workers and (d.tier not in released or d.desired > (d.current or 0))
            )  # fmt: skip
            return self._act(key, body, runtime, others, broker_problem, tier_problem) if others else []
        held = runtime.held_by_other_scaler  # an HPA or ScaledObject scales these: neither ask nor scale
        asking = [d.tier for d in decisions if d.asks_workers and d.tier not in held] if broker_problem is None else []
        if asking:
            cached = self.scale_in.reusable_censuses(key, asking, observations, now)
            if cached is not None:
                again = decide(
                    spec.tiers, observations, current, histories, now=now,
                    max_total_replicas=spec.max_total_replicas, paused=spec.paused, workers=cached,
                )  # fmt: skip
                if not any(d.tier in cached and d.desired < (d.current or 0) for d in again):
                    self._steady.pop(key, None)
                    return self._act(key, body, runtime, again, broker_problem, tier_problem)
            self._start(key, frozenset(asking), self._ask_then_decide(key, asking))
            self._steady.pop(key, None)
            # The other tiers are acted on now: a census never holds a pool's scale-ups.
            others = tuple(d for d in decisions if d.tier not in asking)
            return self._act(key, body, runtime, others, broker_problem, tier_problem) if others else []
        if (
            not broker_problem
            and not tier_problem
            and all(
                d.reason is Reason.STEADY and d.current is not None and d.desired == d.current == d.recommended
                for d in decisions
            )
        ):
            changes = None if isinstance(result, BrokerError) else result.changed_at
            self._steady[key] = _Steady(signature, current, decided_at=now, seen=seen, changes=changes)
        else:
            self._steady.pop(key, None)
        return self._act(key, body, runtime, decisions, broker_problem, tier_problem)

    def _skip(self, steady: _Steady, now: float) -> list[Coroutine[Any, Any, None]]:
        steady.skipped_at = now  # a skip shows nothing new: the status is not refreshed, its clock not moved
        return []

    def _start(self, key: ObjKey, tiers: frozenset[str], work: Coroutine[Any, Any, None]) -> None:
        """Run one background scale-in step of a pool (at most one at a time) over ``tiers``."""
        if key in self._scale_ins:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._scale_ins[key] = task
        self._asking[key] = tiers

        def done(_t: asyncio.Task[None], k: ObjKey = key) -> None:
            self._scale_ins.pop(k, None)
            self._asking.pop(k, None)

        task.add_done_callback(done)

    def _target(self, key: ObjKey, spec: CeleryWorkerPoolSpec) -> ControlTarget | None:
        runtime = self.cache.runtime[key]
        if runtime.broker_url is None:
            return None
        b = spec.broker
        return ControlTarget(runtime.broker_url, b.global_keyprefix, b.master_name, tls=runtime.broker_tls, sep=b.sep)

    def _deployments(self, key: ObjKey, body: Mapping[str, Any], tiers: Any) -> dict[str, tuple[str, int | None]]:
        """Tier -> (its Deployment's uid, spec.replicas): only our own Deployments (by uid)."""
        children = self.cache.children_of(key, owner_uid=str(body["metadata"].get("uid", "")))
        out: dict[str, tuple[str, int | None]] = {}
        for t in tiers:
            dep = children.get(("Deployment", tier_child_name(key[1], t))) or {}
            replicas = (dep.get("spec") or {}).get("replicas")
            out[t] = (str((dep.get("metadata") or {}).get("uid", "")), None if replicas is None else int(replicas))
        return out

    async def _resume(self, key: ObjKey, body: Mapping[str, Any], spec: CeleryWorkerPoolSpec) -> None:
        target = self._target(key, spec)
        if target is None:
            return
        deps = self._deployments(key, body, [t.name for t in spec.tiers])
        tiers = {t.name: (deps[t.name][0], deps[t.name][1], tuple(t.queues)) for t in spec.tiers if deps[t.name][0]}
        try:
            await self.scale_in.resume(key, target, tiers)
        except Exception:  # one pool's failed resume must not end autoscaling
            log.exception("pool %s/%s: resuming scale-in marks failed", *key)

    async def _release(
        self, key: ObjKey, body: Mapping[str, Any], spec: CeleryWorkerPoolSpec, tiers: list[str]
    ) -> None:
        target = self._target(key, spec)
        if target is None:
            return
        deps = self._deployments(key, body, tiers)
        queues = {t.name: tuple(t.queues) for t in spec.tiers}
        try:
            for tier in tiers:
                await self.scale_in.release(key, tier, target, queues[tier], deps[tier][0], "demand returned")
        except Exception:
            log.exception("pool %s/%s: releasing drained workers failed", *key)

    async def _ask_then_decide(self, key: ObjKey, asking: list[str]) -> None:
        """The background scale-in of one pool: ask the workers, decide again with their answer and the
        freshest observation (the poll went on meanwhile), act on the asked tiers."""
        namespace, name = key
        inputs = self._inputs.get(key)
        runtime = self.cache.runtime.get(key)
        if inputs is None or runtime is None:
            return
        target = self._target(key, inputs.spec)
        if target is None:
            return
        ref = pool_ref(inputs.body)
        deployments = {t: uid for t, (uid, _) in self._deployments(key, inputs.body, asking).items()}
        try:
            census = await self.scale_in.census(key, ref, target, inputs.observations, asking, deployments)
            self._note_remote_control(key, runtime, census)
            inputs = self._inputs.get(key) or inputs  # the freshest observation, not the one that asked
            spec, body = inputs.spec, inputs.body
            current = {t: (deps[1] if deps[0] else None) for t, deps in
                       self._deployments(key, body, [t.name for t in spec.tiers]).items()}  # fmt: skip
            # A tier whose control path failed is in census.workers as all-silent (busy: held); one whose
            # pods could not be listed is not, and no decision of it is acted on.
            workers = census.workers
            decisions = decide(
                spec.tiers, inputs.observations, current, dict(runtime.history), now=self.clock(),
                max_total_replicas=spec.max_total_replicas, paused=spec.paused, workers=workers,
            )  # fmt: skip
            mine = tuple(d for d in decisions if d.tier in census.workers)
            removals = self.scale_in.removals(mine, census, target, {t.name: t for t in spec.tiers})
            calls = census.notes + self._act(key, body, runtime, mine, None, inputs.tier_problem, removals)
            queues = {t.name: tuple(t.queues) for t in spec.tiers}
            for tier, w in census.workers.items():
                calls.append(self.scale_in.give_back(key, tier, target, w, census.live[tier], queues[tier]))
            if calls:
                await asyncio.gather(*calls)
        except Exception:  # one pool's failed scale-in must not end autoscaling
            log.exception("pool %s/%s: scale-in failed", namespace, name)

    def _note_remote_control(self, key: ObjKey, runtime: PoolRuntime, census: Census) -> None:
        """The RemoteControl condition's input: which asked tiers have workers that cannot be asked."""
        before = (dict(runtime.remote_control_off), runtime.remote_control_checked, dict(runtime.scale_in_held))
        for tier in census.deployments:
            if tier in census.unknown:
                runtime.scale_in_held[tier] = census.unknown[tier]
            else:
                runtime.scale_in_held.pop(tier, None)
        for tier in census.workers:
            if tier in census.remote_control_off:
                runtime.remote_control_off[tier] = census.remote_control_off[tier]
            else:
                runtime.remote_control_off.pop(tier, None)  # they answer again
        runtime.remote_control_checked = True
        if (runtime.remote_control_off, runtime.remote_control_checked, runtime.scale_in_held) != before:
            self.refresh_status(key)

    async def _scale_tier(
        self, key: ObjKey, ref: ObjectRef, d: Decision, previous: TierScaling, removal: Removal | None = None
    ) -> None:
        namespace, name = key
        runtime = self.cache.runtime[key]
        going: set[str] = set()
        if removal is not None and d.current is not None:
            replicas, note, going = await self.scale_in.remove(key, d.tier, removal, d)
            d = with_desired(d, d.current if replicas is None else max(d.desired, replicas), note)
            written = self.cache.children_of(key).get(("Deployment", tier_child_name(name, d.tier))) or {}
            if going and (written.get("spec") or {}).get("replicas") != d.current:
                # A scale-up was written meanwhile: this round's count is stale; its candidates go back.
                await self.scale_in.release(key, d.tier, removal.target, removal.queues, removal.deployment_uid,
                                            "the tier was scaled meanwhile")  # fmt: skip
                return
            if d.desired == d.current:
                self.scale_in.forget_census(key, d.tier)
                self._record(key, runtime, d, previous)
                self.refresh_status(key)
                return
        # Known to the reconciler before the write: its watch event of our scale, handled in its thread while
        # this one waits, must not find the old count and write it back (seen: 2 -> 1 -> 2 -> 1).
        applied = runtime.desired.get(d.tier)
        runtime.desired[d.tier] = d.desired
        try:
            await asyncio.to_thread(self.kube.scale, namespace, tier_child_name(name, d.tier), d.desired)
        except ApiError as err:
            log.warning("pool %s/%s: could not scale tier %s: %s", namespace, name, d.tier, err)
            if applied is None:
                runtime.desired.pop(d.tier, None)
            else:
                runtime.desired[d.tier] = applied
            self._steady.pop(key, None)
            if removal is not None:
                await self.scale_in.release(key, d.tier, removal.target, removal.queues, removal.deployment_uid,
                                            "the scale failed")  # fmt: skip
            return
        self.cache.note_replicas(key, tier_child_name(name, d.tier), d.desired)
        self.scale_in.forget_census(key, d.tier)
        if removal is not None and going:
            asyncio.get_running_loop().create_task(self.scale_in.check_drained(
                key, d.tier, removal.target, removal.queues, removal.deployment_uid, going))  # fmt: skip
        # Only once the replicas were written: the history records the scale as done.
        self._record(key, runtime, d, previous, scaled_at=utcnow())
        direction = "ScaledUp" if d.direction is Direction.UP else "ScaledDown"
        metrics.SCALING_DECISIONS.labels(namespace, name, d.tier, d.direction.value, d.reason.value).inc()
        log.info("pool %s/%s: %s", namespace, name, d.message)
        self._last_status[key] = self.clock()
        self._shown[key] = _shown(runtime)
        self.refresh_status(key)
        self.events.post(ref, direction, d.message)  # off the loop's threads: a storm's scales go first

    def _record(
        self, key: ObjKey, runtime: PoolRuntime, d: Decision, previous: TierScaling, *, scaled_at: str | None = None
    ) -> TierScaling:
        """Keep decision `d` of one tier (`scaled_at`: it was written then); every count kept of it
        is derived from it here (:mod:`~celery_fleet.planning.tier_scaling`)."""
        runtime.history[d.tier] = d.history
        applied = applied_replicas(d, runtime.desired.get(d.tier), written=scaled_at is not None)
        if applied is not None:
            runtime.desired[d.tier] = applied
        scaling = runtime.scaling[d.tier] = tier_scaling(d, previous, scaled_at=scaled_at)
        # The worker gauges are the status record's counts, not a census's: a census whose decision is
        # not kept (its scale refused) changes neither, and a forgotten series comes back with the next.
        labels = (key[0], key[1], d.tier)
        if scaling.busy_workers is not None:
            self.series.set(metrics.BUSY_WORKERS, labels, scaling.busy_workers)
        if scaling.scheduled is not None:
            self.series.set(metrics.SCHEDULED_TASKS, labels, scaling.scheduled)
        return scaling

    def _act(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        runtime: PoolRuntime,
        decisions: tuple[Decision, ...],
        broker_problem: tuple[str, str] | None,
        tier_problem: tuple[str, str] | None = None,
        removals: Mapping[str, Removal] | None = None,
    ) -> list[Coroutine[Any, Any, None]]:
        namespace, name = key
        ref = pool_ref(body)
        calls: list[Coroutine[Any, Any, None]] = []
        urgent = False
        removals = removals or {}
        for d in decisions:
            previous = runtime.scaling.get(d.tier, TierScaling())
            if d.reason is Reason.BUSY_WORKERS and d.desired == d.current:
                calls += self.notes.once(key, ref, d.tier, "ScaleDownHeld", d.message)
            if (
                d.current is not None
                and d.desired != d.current
                and not (broker_problem and d.desired < d.current)
                and d.tier not in runtime.held_by_other_scaler  # the pool's ScalerConflict condition says why
            ):
                calls.append(self._scale_tier(key, ref, d, previous, removals.get(d.tier)))
                self.series.set(metrics.DESIRED_REPLICAS, (namespace, name, d.tier), d.desired)
                continue
            scaling = self._record(key, runtime, d, previous)
            if (scaling.desired_replicas, scaling.scheduled, scaling.busy_workers) != (
                previous.desired_replicas,
                previous.scheduled,
                previous.busy_workers,
            ):
                urgent = True
            self.series.set(metrics.DESIRED_REPLICAS, (namespace, name, d.tier), d.desired)
            self.series.set(metrics.MAX_REPLICAS, (namespace, name, d.tier), self.max_replicas(key, d.tier))
            if d.current is not None:
                self.series.set(metrics.CURRENT_REPLICAS, (namespace, name, d.tier), d.current)

        problem = broker_problem or tier_problem
        if problem != runtime.broker_problem:
            urgent = True
            if problem is not None:
                if broker_problem is not None and broker_problem[0] != OWN_POLL_SLOW_REASON:
                    self.series.set(metrics.BROKER_UP, (namespace, name), 0)  # our own slow read: not the broker
                log.warning("pool %s/%s: %s", namespace, name, problem[1])
                calls.append(asyncio.to_thread(post_event, self.kube, ref, problem[0], problem[1], "Warning"))
            elif runtime.broker_problem is not None:
                message = "the broker answers again; autoscaling resumed"
                calls.append(asyncio.to_thread(post_event, self.kube, ref, "BrokerReachable", message))
            runtime.broker_problem = problem
        now = self.clock()
        # What the status shows of the autoscaler: refreshing it when none of that changed would be a
        # reconcile per pool every few seconds that writes nothing (at 1000 idle pools, most of the CPU).
        shown = _shown(runtime)
        due = now - self._last_status.get(key, 0.0) >= STATUS_REFRESH_SECONDS
        if urgent or (due and shown != self._shown.get(key)):
            self._last_status[key] = now
            self._shown[key] = shown
            self.refresh_status(key)
        return calls
