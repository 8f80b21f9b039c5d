"""Reconcile one CeleryBeat: its ServiceAccount, Role, RoleBinding, Lease and Deployment, and status.

The Lease decides who runs beat (the elector in each pod); the operator only creates
the objects, reports the Lease's holder, and raises Degraded when nobody has held it
for longer than its duration.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import API_VERSION, CeleryBeatSpec, InvalidSpec, parse_beat
from celery_fleet.handlers.cache import BEAT_LABEL, FleetCache, ObjKey
from celery_fleet.handlers.children import ChildConflict, apply_child
from celery_fleet.handlers.pool_reconciler import Outcome, object_version, rejected_child, utcnow
from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.events import ObjectRef, post_event
from celery_fleet.planning.beat_scheduler import NOT_EXACTLY_ONCE, scheduler_advice
from celery_fleet.planning.beat_status import BeatStatusInput, beat_status, current_leader, parse_time, view_lease
from celery_fleet.planning.beat_workload import beat_children, beat_names
from celery_fleet.planning.conditions import conditions_equal, merge_conditions
from celery_fleet.planning.drift import has_drifted
from celery_fleet.planning.ownership import CHILD_CONFLICT, is_controlled_by
from celery_fleet.planning.pool_status import Problem

log = logging.getLogger(__name__)

BEAT_API_VERSION = API_VERSION
# renewTime moves every retry period; status follows it only this often unless the leader changes.
RENEW_TIME_REFRESH = dt.timedelta(seconds=30)
# Children we do not watch (to keep watches few) are re-applied at most this often.
UNWATCHED_REAPPLY_SECONDS = 300.0
WATCHED_KINDS = frozenset({"Deployment", "Lease"})


# Identity and the Lease first: a name someone else holds stops the reconcile before anything
# grants rights on it (the Role) or runs pods against it (the Deployment).
APPLY_ORDER = {"ServiceAccount": 0, "Lease": 1, "Role": 2, "RoleBinding": 3, "Deployment": 4}


@dataclass
class BeatRuntime:
    # child -> (digest, when, uid) of what this process last applied
    applied: dict[tuple[str, str], tuple[str, float, str]] = field(default_factory=dict)
    leader: str | None = None
    leaderless_since: dt.datetime | None = None
    advised: tuple[int, str] | None = None  # (generation, advice) last posted as a Warning Event


class BeatReconciler:
    def __init__(self, kube: Kube, cache: FleetCache, elector_image: str) -> None:
        self.kube = kube
        self.cache = cache
        self.elector_image = elector_image
        self.runtime: dict[ObjKey, BeatRuntime] = {}

    def _gone(self, key: ObjKey, body: dict[str, Any]) -> bool:
        """Whether a 404 was the beat itself (its namespace deleted: the watch stopped before its DELETED
        event). A failed read is not gone: it is retried."""
        try:
            if self.kube.get(BEAT_API_VERSION, "CeleryBeat", *key) is not None:
                return False
        except ApiError:
            return False
        if not self.cache.drop_beat_if_uid(key, body["metadata"].get("uid")):
            return False
        self.runtime.pop(key, None)
        metrics.forget_beat(*key)
        log.info("beat %s/%s: gone (its namespace deleted?), forgotten", *key)
        return True

    def reconcile(self, key: ObjKey) -> Outcome:
        body = self.cache.beats.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.runtime.pop(key, None)
            metrics.forget_beat(*key)
            return Outcome()
        started = time.perf_counter()
        try:
            outcome = self._reconcile(key, body)
            metrics.RECONCILES.labels("CeleryBeat", "error" if outcome.error else "ok").inc()
            return outcome
        except ApiError as err:
            if err.status == 404 and self._gone(key, body):
                return Outcome()
            metrics.RECONCILES.labels("CeleryBeat", "error").inc()
            log.warning("beat %s/%s: API error, will retry: %s", *key, err)
            return Outcome(error=True)
        finally:
            metrics.RECONCILE_SECONDS.labels("CeleryBeat").observe(time.perf_counter() - started)

    def _reconcile(self, key: ObjKey, body: dict[str, Any]) -> Outcome:
        namespace = key[0]
        ref = ObjectRef.from_body({**body, "apiVersion": BEAT_API_VERSION, "kind": "CeleryBeat"})
        runtime = self.runtime.setdefault(key, BeatRuntime())
        try:
            spec = parse_beat(body)
        except InvalidSpec as err:
            invalid = Problem("InvalidSpec", f"{err.message}. Fix the manifest and apply it again.")
            self._write_status(key, body, ref, runtime, None, invalid)
            return Outcome()
        problem: Problem | None = None
        if spec.broker.url_secret_ref is not None:
            sref = spec.broker.url_secret_ref
            if not self.kube.secret_value(namespace, sref.name, sref.key, reader=object_version(body)):
                problem = Problem(
                    "BrokerSecretMissing",
                    f"spec.broker.urlSecretRef: Secret {namespace}/{sref.name} has no (non-empty) key {sref.key!r}. "
                    "Create it or point urlSecretRef at an existing Secret.",
                )
        advice = scheduler_advice(spec.scheduler)
        generation = int(body["metadata"].get("generation", 0))
        if advice is not None and runtime.advised != (generation, advice):
            post_event(self.kube, ref, NOT_EXACTLY_ONCE, advice, "Warning")
            runtime.advised = (generation, advice)
        if problem is None and not spec.paused:
            try:
                self._apply_children(key, body, spec, ref, runtime)
            except ChildConflict as conflict:
                problem = conflict.problem
            except ApiError as err:
                problem = rejected_child(err)
                if problem is None:
                    raise
        requeue = self._write_status(key, body, ref, runtime, spec, problem)
        if problem is not None and problem.reason.startswith("BrokerSecret"):
            return Outcome(error=True)
        if problem is not None and problem.reason == CHILD_CONFLICT:
            return Outcome(error=True)  # nothing wakes us when the other object goes: back off and look again
        return Outcome(requeue_after=requeue)

    def _apply_children(
        self, key: ObjKey, body: dict[str, Any], spec: CeleryBeatSpec, ref: ObjectRef, runtime: BeatRuntime
    ) -> None:
        namespace, name = key
        observed = self.cache.children_of(key, beat=True)  # by label: may hold look-alikes that are not ours
        now = time.monotonic()
        children = beat_children(name, namespace, body["metadata"]["uid"], spec, self.elector_image)
        for child in sorted(children, key=lambda c: APPLY_ORDER.get(c["kind"], len(APPLY_ORDER))):
            ckey = (child["kind"], child["metadata"]["name"])
            current: dict[str, Any] | None = None
            known_uid: str | None = None
            if ckey[0] in WATCHED_KINDS:
                current = observed.get(ckey)
                if current is not None and is_controlled_by(current, ref.uid) and not has_drifted(child, current):
                    continue
                created = current is None
            else:
                digest = repr(child)
                last = runtime.applied.get(ckey)
                if last is not None and last[0] == digest and now - last[1] < UNWATCHED_REAPPLY_SECONDS:
                    continue
                created = last is None
                known_uid = (last[2] or None) if last is not None else None
            # A ChildConflict stops here: nothing after it in APPLY_ORDER is written.
            applied = apply_child(self.kube, child, owner=ref, current=current, known_uid=known_uid)
            runtime.applied[ckey] = (repr(child), now, str((applied.get("metadata") or {}).get("uid", "")))
            if ckey[0] in WATCHED_KINDS:
                self.cache.put_child(BEAT_LABEL, {**applied, "kind": ckey[0]})
            if created or ckey[0] in WATCHED_KINDS:
                verb = "Created" if created else "Updated"
                message = f"{verb} {ckey[0]} {ckey[1]}"
                metrics.CHILD_WRITES.labels(ckey[0], verb.lower()).inc()
                if ckey[0] in WATCHED_KINDS or created:
                    log.info("beat %s/%s: %s", namespace, name, message)
                    post_event(self.kube, ref, verb, message)

    def _write_status(
        self,
        key: ObjKey,
        body: dict[str, Any],
        ref: ObjectRef,
        runtime: BeatRuntime,
        spec: CeleryBeatSpec | None,
        problem: Problem | None,
    ) -> float | None:
        namespace, name = key
        observed = self.cache.children_of(key, beat=True, owner_uid=ref.uid)
        names = beat_names(name)
        duration = spec.lease.duration_seconds if spec else 15
        lease = view_lease(observed.get(("Lease", names.lease)), duration)
        now = dt.datetime.now(dt.UTC)
        leader = current_leader(lease, now)
        if leader is None and runtime.leaderless_since is None:
            runtime.leaderless_since = now
        elif leader is not None:
            runtime.leaderless_since = None
        if leader != runtime.leader:
            if leader is not None:
                message = f"{leader} now leads (lease transitions: {lease.transitions})"
                post_event(self.kube, ref, "LeaderElected", message)
                metrics.BEAT_LEADER_CHANGES.labels(namespace, name).inc()
            elif runtime.leader is not None:
                post_event(self.kube, ref, "LeaderLost", f"{runtime.leader} no longer holds the lease", "Warning")
            runtime.leader = leader
        metrics.BEAT_HAS_LEADER.labels(namespace, name).set(1 if leader else 0)
        leaderless = (now - runtime.leaderless_since).total_seconds() if runtime.leaderless_since else 0.0
        metrics.BEAT_LEADERLESS_SECONDS.labels(namespace, name).set(leaderless)

        inp = BeatStatusInput(
            generation=int(body["metadata"].get("generation", 0)),
            lease=lease,
            now=now,
            leaderless_since=runtime.leaderless_since,
            configured_duration=duration,
            deployment_exists=("Deployment", names.deployment) in observed,
            problem=problem,
        )
        status, updates = beat_status(inp)
        old = body.get("status") or {}
        status["conditions"] = merge_conditions(old.get("conditions"), updates, generation=inp.generation, now=utcnow())
        if not self._status_same(old, status):
            if problem is not None and _degraded_message(old) != problem.message:
                post_event(self.kube, ref, problem.reason, problem.message, "Warning")
                log.warning("beat %s/%s: %s: %s", namespace, name, problem.reason, problem.message)
            self.kube.patch_status(BEAT_API_VERSION, "CeleryBeat", namespace, name, status)
            body["status"] = status  # until the watch brings it back
        # If renewals stop, no event will wake us: look again when the lease would expire, and
        # while nobody leads, often enough to raise Degraded on time.
        if problem is not None:
            return None
        if leader is None:
            return float(duration) / 2
        assert lease.renew_time is not None
        expires = lease.renew_time + dt.timedelta(seconds=lease.duration_seconds)
        return max(0.5, (expires - now).total_seconds() + 0.5)

    @staticmethod
    def _status_same(old: dict[str, Any], new: dict[str, Any]) -> bool:
        if not conditions_equal(old.get("conditions"), new.get("conditions")):
            return False
        for k in ("observedGeneration", "leader", "leaseTransitions"):
            if old.get(k) != new.get(k):
                return False
        old_renew, new_renew = old.get("renewTime"), new.get("renewTime")
        if old_renew == new_renew:
            return True
        a, b = parse_time(old_renew), parse_time(new_renew)
        return a is not None and b is not None and abs(b - a) < RENEW_TIME_REFRESH


def _degraded_message(status: dict[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Degraded" and c.get("status") == "True":
            return str(c.get("message"))
    return None
