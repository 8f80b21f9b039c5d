"""Reconcile one CeleryWorkerPool: gather (watch cache) -> decide (pure) -> act (apply).

Runs in a worker thread (the official client is blocking). Level-triggered: it is
called for any event on the pool or its children and converges from whatever it
finds, so a missed event, a restart mid-reconcile or a hand edit all end the same.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet.api.models import API_VERSION, POOL_KIND, CeleryWorkerPoolSpec, InvalidSpec, Tier, parse_pool
from celery_fleet.brokers.redis.connection import TlsSettings
from celery_fleet.brokers.source import ErrorKind
from celery_fleet.handlers.cache import FleetCache, ObjKey, PoolRuntime
from celery_fleet.handlers.children import ChildConflict, apply_child
from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.events import EventPoster, ObjectRef
from celery_fleet.planning import scaler_conflict
from celery_fleet.planning.conditions import ConditionUpdate, conditions_equal, merge_conditions, scale_in_condition
from celery_fleet.planning.drift import drifted_fields, has_drifted
from celery_fleet.planning.ownership import CHILD_CONFLICT, is_controlled_by
from celery_fleet.planning.pool_status import (
    PoolStatusInput,
    Problem,
    observe_deployment,
    pool_status,
    queues_consumed,
)
from celery_fleet.planning.workload import POOL_LABEL, TIER_LABEL, pool_children, tier_child_name

log = logging.getLogger(__name__)
# The autoscaler's reason when the operator's own poll work was slow (brokers.source.ErrorKind.OWN_POLL_SLOW).
OWN_POLL_SLOW_REASON = f"Broker{ErrorKind.OWN_POLL_SLOW.value}"

POOL_API_VERSION = API_VERSION


STATUS_COALESCE_SECONDS = 2.0  # progress-only status writes of one pool, at most one per this
CHILD_APPLY_THREADS = 16  # a pool's children applied at once, over every reconcile worker


def pool_ref(body: Mapping[str, Any]) -> ObjectRef:
    """The pool's reference for Events; the cache's bodies may lack apiVersion and kind."""
    return ObjectRef.from_body({**body, "apiVersion": POOL_API_VERSION, "kind": POOL_KIND})


@dataclass(frozen=True)
class Outcome:
    """What the work queue should do next with this key."""

    requeue_after: float | None = None
    error: bool = False


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def replicas_for(
    tier: Tier, observed: Mapping[str, Any] | None, scaler_desired: int | None, *, held: bool = False
) -> int:
    """The one value of spec.replicas: the autoscaler's, else the current one kept within bounds.

    `held`: another autoscaler (HPA, ScaledObject) scales the tier; its count is kept as it is, even
    outside the tier's bounds, so an apply never writes a different one."""
    if held and observed is not None:
        return int((observed.get("spec") or {}).get("replicas", tier.replicas.min))
    if scaler_desired is not None:
        return max(tier.replicas.min, min(tier.replicas.max, scaler_desired))
    if observed is not None:
        current = int((observed.get("spec") or {}).get("replicas", tier.replicas.min))
        return max(tier.replicas.min, min(tier.replicas.max, current))
    return tier.replicas.min


def _attempt(
    kube: Kube, child: dict[str, Any], owner: ObjectRef, current: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, ApiError | ChildConflict | None]:
    """One child's apply, its failure returned (not raised) so the pool's other children still land."""
    try:
        return apply_child(kube, child, owner=owner, current=current), None
    except (ApiError, ChildConflict) as err:
        return None, err


def rejected_child(err: ApiError) -> Problem | None:
    """The problem to report when the apiserver refused a child built from the spec, else None.

    A label value, a quantity or an env entry the apiserver cannot take: retrying cannot help,
    only a spec change can, so it goes to the conditions rather than only to the log.
    """
    # Server-side apply answers 500 "failed to convert new object" for values it cannot decode
    # (e.g. a quantity "lots"): a rejection like 400/422, not a server fault.
    unconvertible = err.status == 500 and err.message.startswith("failed to convert new object")
    if err.status not in (400, 422) and not unconvertible:
        return None
    return Problem(
        "ChildRejected",
        f"the apiserver rejected a child built from this spec: {err.message}. "
        "Fix the matching field of the spec and apply it again.",
    )


class PoolReconciler:
    def __init__(
        self,
        kube: Kube,
        cache: FleetCache,
        *,
        clock: Callable[[], float] = time.monotonic,
        events: EventPoster | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self._clock = clock
        self._status_written: dict[ObjKey, float] = {}  # when each pool's status was last written
        self.events = events or EventPoster(kube)
        self._children_pool = ThreadPoolExecutor(max_workers=CHILD_APPLY_THREADS, thread_name_prefix="apply")

    def reconcile(self, key: ObjKey) -> Outcome:
        body = self.cache.pool(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self._status_written.pop(key, None)
            return Outcome()  # deleted: the garbage collector removes the children
        started = time.perf_counter()
        try:
            outcome = self._reconcile(key, body)
            metrics.RECONCILES.labels("CeleryWorkerPool", "error" if outcome.error else "ok").inc()
            return outcome
        except ApiError as err:
            if err.status == 404 and self._gone(key, body):
                return Outcome()
            metrics.RECONCILES.labels("CeleryWorkerPool", "error").inc()
            log.warning("pool %s/%s: API error, will retry: %s", *key, err)
            return Outcome(error=True)
        finally:
            metrics.RECONCILE_SECONDS.labels("CeleryWorkerPool").observe(time.perf_counter() - started)

    def _gone(self, key: ObjKey, body: Mapping[str, Any]) -> bool:
        """Whether a 404 was the pool itself. Deleting a namespace stops the watch of it (Kopf) before
        the pool's DELETED event arrives: without this the cache kept the pool, retried forever and
        polled its broker. Any doubt (the read failed) is not gone: it is retried."""
        try:
            if self.kube.get(POOL_API_VERSION, "CeleryWorkerPool", *key) is not None:
                return False
        except ApiError:
            return False
        if not self.cache.drop_pool_if_uid(key, body["metadata"].get("uid")):
            return False
        self._status_written.pop(key, None)
        log.info("pool %s/%s: gone (its namespace deleted?), forgotten", *key)
        return True

    def _reconcile(self, key: ObjKey, body: dict[str, Any]) -> Outcome:
        namespace, name = key
        ref = pool_ref(body)
        runtime = self.cache.runtime[key]

        try:
            spec = parse_pool(body)
        except InvalidSpec as err:
            invalid = Problem("InvalidSpec", f"{err.message}. Fix the manifest and apply it again.")
            self._write_status(key, body, ref, spec=None, problem=invalid)
            return Outcome()

        runtime.held_by_other_scaler = frozenset(self._other_scalers(key, spec))

        problem = self._resolve_broker(namespace, spec, runtime, reader=object_version(body))
        if problem is None:
            problem = self._resolve_tls(namespace, spec, runtime, reader=object_version(body))
        if problem is None and spec.broker.tls is not None and spec.broker.tls.insecure_skip_verify:
            if not runtime.insecure_tls_announced:
                runtime.insecure_tls_announced = True
                message = (
                    "spec.broker.tls.insecureSkipVerify: the broker's certificate is NOT verified, for the operator "
                    "and the workers; anyone on the network path can read the traffic and the broker password"
                )
                log.warning("pool %s/%s: %s", namespace, name, message)
                self.events.post(ref, "BrokerTLSInsecure", message, "Warning")
        else:
            runtime.insecure_tls_announced = False
        if problem is not None:
            self._write_status(key, body, ref, spec=spec, problem=problem)
            return Outcome(error=True)

        if not spec.paused:
            try:
                conflicts = self._apply_children(key, name, body, spec, ref)
            except ApiError as err:
                rejected = rejected_child(err)
                if rejected is None:
                    raise
                self._write_status(key, body, ref, spec=spec, problem=rejected)
                return Outcome(error=True)
            if conflicts:
                # Nothing wakes us when a foreign object goes away: retry with backoff.
                conflict = Problem(CHILD_CONFLICT, " ".join(p.message for p in conflicts))
                self._write_status(key, body, ref, spec=spec, problem=conflict)
                return Outcome(error=True)
        return Outcome(requeue_after=self._write_status(key, body, ref, spec=spec, problem=None))

    def _other_scalers(self, key: ObjKey, spec: CeleryWorkerPoolSpec) -> dict[str, list[scaler_conflict.OtherScaler]]:
        """Tier -> the HPAs and ScaledObjects (from the watch cache) that target its Deployment."""
        deployments = {t.name: tier_child_name(key[1], t.name) for t in spec.tiers}
        return scaler_conflict.conflicts(deployments, self.cache.other_scalers_in(key[0]))

    def _resolve_broker(
        self, namespace: str, spec: CeleryWorkerPoolSpec, runtime: PoolRuntime, *, reader: str
    ) -> Problem | None:
        broker = spec.broker
        if broker.url is not None:
            runtime.broker_url = broker.url
            return None
        ref = broker.url_secret_ref
        assert ref is not None  # exactly one of url / urlSecretRef (schema and model)
        value = self.kube.secret_value(namespace, ref.name, ref.key, reader=reader)
        if value is None:
            return Problem(
                "BrokerSecretMissing",
                f"spec.broker.urlSecretRef: Secret {namespace}/{ref.name} has no key {ref.key!r} (or does not "
                f"exist). Create it (kubectl create secret generic {ref.name} --from-literal={ref.key}=rediss://...)"
                " or point urlSecretRef at an existing Secret.",
            )
        if not value.strip():
            return Problem(
                "BrokerSecretEmpty",
                f"spec.broker.urlSecretRef: key {ref.key!r} of Secret {namespace}/{ref.name} is empty; "
                "store the broker URL (redis:// or rediss://) in it.",
            )
        try:
            parse_broker_url(value)  # the same rules as spec.broker.url, passwords allowed
        except BrokerUrlError as err:
            return Problem(
                "BrokerSecretInvalid",
                f"spec.broker.urlSecretRef: key {ref.key!r} of Secret {namespace}/{ref.name} does not hold a "
                f"usable broker URL: {err.message}. Store a redis://, rediss:// or sentinel:// URL in it.",
            )
        if value.strip().startswith("sentinel://") and broker.master_name is None:
            return Problem(
                "BrokerSecretInvalid",
                f"spec.broker.urlSecretRef: key {ref.key!r} of Secret {namespace}/{ref.name} holds sentinel:// URLs; "
                "set spec.broker.masterName (Celery's broker_transport_options.master_name).",
            )
        if broker.tls is not None and (";" in value or "?" in value or not value.strip().startswith("rediss://")):
            return Problem(
                "BrokerSecretInvalid",
                f"spec.broker.urlSecretRef: with spec.broker.tls, key {ref.key!r} of Secret {namespace}/{ref.name} "
                "must hold one rediss:// URL without a query: the operator adds the TLS options for the workers.",
            )
        runtime.broker_url = value.strip()
        return None

    def _resolve_tls(
        self, namespace: str, spec: CeleryWorkerPoolSpec, runtime: PoolRuntime, *, reader: str
    ) -> Problem | None:
        """Read spec.broker.tls's CA and client certificate (for the operator's own reads)."""
        tls = spec.broker.tls
        if tls is None:
            runtime.broker_tls = None
            return None
        ca = cert = key = None
        if tls.ca is not None:
            if tls.ca.secret_name is not None:
                where = f"Secret {namespace}/{tls.ca.secret_name}"
                ca = self.kube.secret_value(namespace, tls.ca.secret_name, tls.ca.key, reader=reader)
            else:
                assert tls.ca.config_map_name is not None
                where = f"ConfigMap {namespace}/{tls.ca.config_map_name}"
                config_map = self.kube.get("v1", "ConfigMap", namespace, tls.ca.config_map_name) or {}
                ca = (config_map.get("data") or {}).get(tls.ca.key)
            if not ca or "BEGIN CERTIFICATE" not in ca:
                return Problem(
                    "BrokerTLSInvalid",
                    f"spec.broker.tls.ca: {where} has no PEM certificate under key {tls.ca.key!r}; "
                    "store the CA that signed the broker's certificate there.",
                )
        if tls.client_certificate is not None:
            c = tls.client_certificate
            cert = self.kube.secret_value(namespace, c.secret_name, c.cert_key, reader=reader)
            key = self.kube.secret_value(namespace, c.secret_name, c.key_key, reader=reader)
            if not cert or not key:
                return Problem(
                    "BrokerTLSInvalid",
                    f"spec.broker.tls.clientCertificate: Secret {namespace}/{c.secret_name} needs keys "
                    f"{c.cert_key!r} and {c.key_key!r} (PEM certificate and key).",
                )
        runtime.broker_tls = TlsSettings(ca, cert, key, tls.insecure_skip_verify)
        return None

    def _apply_children(
        self, key: ObjKey, name: str, body: Mapping[str, Any], spec: CeleryWorkerPoolSpec, ref: ObjectRef
    ) -> list[Problem]:
        """Apply what drifted and delete what is no longer wanted; returns the names taken by others."""
        namespace = key[0]
        observed = self.cache.children_of(key)  # by label: may hold look-alikes that are not ours
        owned = {k: v for k, v in observed.items() if is_controlled_by(v, ref.uid)}
        runtime = self.cache.runtime[key]
        held = runtime.held_by_other_scaler
        replicas = {
            tier.name: replicas_for(
                tier,
                owned.get(("Deployment", tier_child_name(name, tier.name))),
                runtime.desired.get(tier.name),
                held=tier.name in held,
            )
            for tier in spec.tiers
        }
        for tier_name, count in replicas.items():
            if runtime.desired.get(tier_name) is not None and tier_name not in held:
                # A bound that moved the autoscaler's count (min raised) made it the count: a later lower
                # min is then a scale-down for the autoscaler, which asks the workers first (scale-in).
                runtime.desired[tier_name] = count
        desired = pool_children(name, namespace, body["metadata"]["uid"], spec, replicas)
        wanted: set[tuple[str, str]] = set()
        conflicts: list[Problem] = []
        created: dict[str, list[str]] = {}  # kind -> names: one Event for a rollout, not one per child
        todo: list[tuple[dict[str, Any], tuple[str, str], Mapping[str, Any] | None]] = []
        for child in desired:
            ckey = (child["kind"], child["metadata"]["name"])
            wanted.add(ckey)
            current = observed.get(ckey)
            if current is None or ckey not in owned or has_drifted(child, current):
                todo.append((child, ckey, current))
        # A pool's children are independent: applied at once, a rollout costs one round trip, not one
        # per tier (each reconcile worker waits on the apiserver far more than it computes).
        if len(todo) > 1:
            results = list(self._children_pool.map(lambda t: _attempt(self.kube, t[0], ref, t[2]), todo))
        else:
            results = [_attempt(self.kube, child, ref, current) for child, _, current in todo]
        failure: ApiError | None = None
        try:
            for (child, ckey, before), (applied, err) in zip(todo, results, strict=True):
                if isinstance(err, ChildConflict):
                    conflicts.append(err.problem)
                    continue
                if err is not None:
                    failure = failure or err
                    continue
                assert applied is not None
                self.cache.put_child(POOL_LABEL, {**applied, "kind": child["kind"]})
                if before is None:
                    metrics.CHILD_WRITES.labels(child["kind"], "create").inc()
                    created.setdefault(child["kind"], []).append(ckey[1])
                    continue
                paths = drifted_fields({k: child[k] for k in ("metadata", "spec") if k in child}, before)
                message = f"Updated {child['kind']} {ckey[1]} ({', '.join(p.lstrip('.') for p in paths[:3])})"
                metrics.CHILD_WRITES.labels(child["kind"], "update").inc()
                log.info("pool %s/%s: %s", namespace, name, message)
                self.events.post(ref, "Updated", message)
        finally:  # what was created is announced even if another child was refused
            if created:
                message = "Created " + "; ".join(f"{kind} {', '.join(names)}" for kind, names in created.items())
                log.info("pool %s/%s: %s", namespace, name, message)
                self.events.post(ref, "Created", message)
        if failure is not None:
            raise failure
        for ckey, current in owned.items():
            if ckey in wanted or current["metadata"].get("deletionTimestamp"):
                continue
            kind_api = {"Deployment": "apps/v1", "PodDisruptionBudget": "policy/v1"}.get(ckey[0])
            if kind_api is None:
                continue
            tier = (current["metadata"].get("labels") or {}).get(TIER_LABEL, "?")
            if self.kube.delete(kind_api, ckey[0], namespace, ckey[1], uid=current["metadata"].get("uid")):
                message = f"Deleted {ckey[0]} {ckey[1]}: tier {tier} is no longer in the spec"
                if ckey[0] == "PodDisruptionBudget":
                    message = f"Deleted {ckey[0]} {ckey[1]}: tier {tier} has no podDisruptionBudget"
                metrics.CHILD_WRITES.labels(ckey[0], "delete").inc()
                log.info("pool %s/%s: %s", namespace, name, message)
                self.events.post(ref, "Deleted", message)
            self.cache.put_child(POOL_LABEL, {**current, "kind": ckey[0]}, deleted=True)
        return conflicts

    def _write_status(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        ref: ObjectRef,
        *,
        spec: CeleryWorkerPoolSpec | None,
        problem: Problem | None,
    ) -> float | None:
        """Write the pool's status if it changed; returns how long a held-back write waits."""
        namespace, name = key
        observed = self.cache.children_of(key, owner_uid=ref.uid)
        runtime = self.cache.runtime[key]
        tiers = spec.tiers if spec is not None else []
        inp = PoolStatusInput(
            generation=int(body["metadata"].get("generation", 0)),
            tiers=[
                observe_deployment(t.name, observed.get(("Deployment", tier_child_name(name, t.name)))) for t in tiers
            ],
            scaling=dict(runtime.scaling),
            problem=problem,
            paused=bool(spec and spec.paused),
        )
        status, updates = pool_status(inp)
        if problem is None and runtime.broker_problem is not None:
            reason, message = runtime.broker_problem
            # Our own read overran its budget: the broker answered, so the condition is about us, not it.
            if reason == OWN_POLL_SLOW_REASON:
                updates.append(ConditionUpdate("BrokerReachable", "True", reason, message))
            else:
                updates.append(ConditionUpdate("BrokerReachable", "False", reason, message))
        elif problem is None and runtime.scaling:
            updates.append(ConditionUpdate("BrokerReachable", "True", "Polled", "the broker answered the last poll"))
        if problem is None and runtime.remote_control_off:
            message = " ".join(runtime.remote_control_off[t] for t in sorted(runtime.remote_control_off))
            updates.append(ConditionUpdate("RemoteControl", "False", "RemoteControlOff", message))
        elif problem is None and runtime.remote_control_checked:
            updates.append(
                ConditionUpdate("RemoteControl", "True", "Answering", "the workers asked answer remote control")
            )
        if problem is None and runtime.unconsumed is not None:
            updates.append(queues_consumed(runtime.unconsumed, list(runtime.unconsumed)))
        if problem is None and (scale_in := scale_in_condition(runtime.scale_in_held, runtime.remote_control_checked)):
            updates.append(scale_in)
        if problem is None and runtime.layout_problem is not None:
            updates.append(ConditionUpdate("BrokerKeyLayout", "False", "UnreadPriorityLists", runtime.layout_problem))
        elif problem is None and runtime.layout_checked:
            updates.append(ConditionUpdate("BrokerKeyLayout", "True", "Matches", "every priority list found is read"))
        old = body.get("status") or {}
        others = self._other_scalers(key, spec) if spec is not None else {}
        shown = any(c.get("type") == scaler_conflict.CONDITION for c in old.get("conditions") or [])
        conflict = scaler_conflict.conflict_condition(name, others, shown=shown)
        if conflict is not None:
            updates.append(conflict)
        status["conditions"] = merge_conditions(old.get("conditions"), updates, generation=inp.generation, now=utcnow())
        if _status_equal(old, status):
            return None
        now = self._clock()
        if _progress_only(old, status, inp.generation):
            # Counts and messages only (pods starting, depths): at most one write per pool per
            # STATUS_COALESCE_SECONDS; a condition's change or a new generation is written at once.
            wait = self._status_written.get(key, -STATUS_COALESCE_SECONDS) + STATUS_COALESCE_SECONDS - now
            if wait > 0:
                return wait
        old_problem = _condition(old, "Degraded")
        if problem is not None and (old_problem or {}).get("message") != problem.message:
            self.events.post(ref, problem.reason, problem.message, "Warning")
            log.warning("pool %s/%s: %s: %s", namespace, name, problem.reason, problem.message)
        old_conflict = _condition(old, scaler_conflict.CONDITION)
        if (
            conflict is not None
            and conflict.status == "True"
            and (old_conflict or {}).get("message") != conflict.message
        ):
            self.events.post(ref, scaler_conflict.CONDITION, conflict.message, "Warning")
            log.warning("pool %s/%s: %s", namespace, name, conflict.message)
        self.kube.patch_status(POOL_API_VERSION, "CeleryWorkerPool", namespace, name, status)
        self._status_written[key] = now
        # Until the watch brings it back: a reconcile before that would write the same status again.
        self.cache.note_status(key, status)
        return None


def object_version(body: Mapping[str, Any]) -> str:
    """Which version of which object asks for a Secret (see Kube.secret_value)."""
    meta = body.get("metadata") or {}
    return f"{meta.get('uid', '')}/{meta.get('resourceVersion', '')}"


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def _progress_only(old: Mapping[str, Any], new: Mapping[str, Any], generation: int) -> bool:
    """Whether `new` differs from `old` only in counts and messages: every condition keeps its status
    and reason, and the generation they speak for is the one already shown."""

    def states(status: Mapping[str, Any]) -> set[tuple[Any, ...]]:
        return {(c.get("type"), c.get("status"), c.get("reason"), c.get("observedGeneration"))
                for c in status.get("conditions") or []}  # fmt: skip

    return old.get("observedGeneration") == generation and states(old) == states(new)


def _status_equal(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    if not conditions_equal(old.get("conditions"), new.get("conditions")):
        return False
    strip = {"conditions"}
    return {k: v for k, v in old.items() if k not in strip} == {k: v for k, v in new.items() if k not in strip}
