# Over 500 lines, not split yet: the poll loop and scale-in (census, drain) share per-pool state.
"""The autoscaler loop: every poll, read each broker once, decide every tier, act on changes.

gather (one pipelined read per broker, shared by its pools) -> decide (pure,
`planning.scaling.decide`) -> act (the scale subresource, an Event, metrics, and a
status refresh through the pool's work queue). A failed read never scales anything
down: `decide` holds the replicas and the pool gets BrokerReachable=False.

Scale-in asks the workers first (`workers.control`, Celery remote control): when a decision
would lower a tier (or raise it on in-flight work that may be ETA tasks), the pool's decision
moves to a background task that lists the tier's pods, asks their workers what they hold, decides
again with that answer (never below the busy workers), sets pod-deletion-cost so the ReplicaSet
controller removes the chosen idle pods, drains them (cancel_consumer) and only then lowers
spec.replicas. One such task per pool at a time; the poll loop never waits for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import CeleryWorkerPoolSpec, InvalidSpec, parse_pool
from celery_fleet.brokers import redis as redis_broker
from celery_fleet.brokers.layout import mismatch_message
from celery_fleet.brokers.poller import BrokerPoller, BrokerRegistry
from celery_fleet.brokers.redis import ConnectOptions
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, KeyLayout, QueueRef, queue_refs
from celery_fleet.handlers.cache import FleetCache, ObjKey, PoolRuntime
from celery_fleet.handlers.pool_reconciler import POOL_API_VERSION
from celery_fleet.kube.client import ApiError, Kube, resource_path
from celery_fleet.kube.events import ObjectRef, post_event
from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scale_in import (
    DELETION_COST_ANNOTATION,
    RemovalPlan,
    TierWorkers,
    WorkerReport,
    plan_removal,
)
from celery_fleet.planning.scaling import (
    Decision,
    Direction,
    ReadFailure,
    Reason,
    Recommendation,
    TierObservation,
    decide,
)
from celery_fleet.planning.workload import tier_child_name, tier_selector_labels
from celery_fleet.workers.control import CeleryControl, ControlError, ControlTarget, WorkerControl

log = logging.getLogger(__name__)

# Queue depth and in-flight change on every poll under load; writing them to status that
# often would cost an apiserver write per pool per second, so only decisions and broker
# state changes refresh status at once, and plain depth changes at most this often.
STATUS_REFRESH_SECONDS = 5.0
# A pool whose inputs have not changed since a decision that changed nothing is not decided
# again (idle fleets are the common case), but at least this often all the same.
FULL_DECIDE_SECONDS = 10.0
# How often each broker's keyspace is scanned (bounded) for priority lists the spec does not name.
LAYOUT_CHECK_SECONDS = 60.0
LAYOUT_MISMATCH = "BrokerKeyLayoutMismatch"
# A tier held by its busy workers is asked again at most this often while its queue readings
# stay the same (a census is a broadcast through the user's broker: per decision, not per poll).
CENSUS_REUSE_SECONDS = 5.0
# After lowering spec.replicas, how long the pods chosen to go may stay before their workers are
# told to consume again (the ReplicaSet controller kept them, or demand brought replicas back).
DRAIN_CHECK_SECONDS = 20.0


@dataclass(frozen=True)
class _Census:
    workers: TierWorkers
    observation: TierObservation
    pods: tuple[str, ...]


@dataclass(frozen=True)
class _Removal:
    plan: RemovalPlan
    target: ControlTarget
    queues: tuple[str, ...]
    live: Mapping[str, Mapping[str, Any]]  # pod name -> pod, as listed for the census


@dataclass
class _Steady:
    signature: tuple[Any, ...]
    replicas: dict[str, int]
    decided_at: float
    skipped_at: float | None = None


_Entry = tuple[ObjKey, Mapping[str, Any], CeleryWorkerPoolSpec, dict[str, list[QueueRef]]]


# A broker is its URL and its TLS settings (two pools on one URL with different CAs poll apart).
BrokerKey = tuple[str, ConnectOptions | None]


def _connect(url: str, options: ConnectOptions | None = None) -> redis_broker.RedisDepthSource:
    options = options or ConnectOptions()
    return redis_broker.connect(url, tls=options.tls, master_name=options.master_name)


def _display(broker: str | BrokerKey) -> str:
    url = broker if isinstance(broker, str) else broker[0]
    try:
        return redis_broker.RedisTarget.parse(url).display
    except BrokerError:
        return "<invalid broker url>"


class Autoscaler:
    def __init__(
        self,
        kube: Kube,
        cache: FleetCache,
        refresh_status: Callable[[ObjKey], None],
        *,
        interval: float = 1.0,
        registry: BrokerRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        layout_check_interval: float = LAYOUT_CHECK_SECONDS,
        control: WorkerControl | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.refresh_status = refresh_status
        self.interval = interval
        self.clock = clock
        # `is None`, not `or`: an empty registry has len() 0 and is falsy.
        self.registry = (
            registry if registry is not None else BrokerRegistry(_connect, max_age=interval / 2, display=_display)
        )
        self._specs: dict[ObjKey, tuple[tuple[str, int], CeleryWorkerPoolSpec, dict[str, list[QueueRef]]]] = {}
        # Last value written per metric child, by pool: label lookups dominate a tick at fleet scale,
        # so a gauge is only touched when its value changes.
        self._gauges: dict[ObjKey, dict[tuple[Any, ...], float]] = {}
        self._last_status: dict[ObjKey, float] = {}
        self._last_reading: dict[int, int] = {}
        self._steady: dict[ObjKey, _Steady] = {}
        self._owner_url: dict[str, BrokerKey] = {}
        self._groups: dict[BrokerKey, list[_Entry]] = {}
        self._pollers: dict[BrokerKey, BrokerPoller] = {}
        self._layout_due: dict[BrokerKey, tuple[float, frozenset[QueueRef]]] = {}
        self.layout_check_interval = layout_check_interval
        self._broker_tasks: dict[BrokerKey, asyncio.Task[None]] = {}
        self.control: WorkerControl = control or CeleryControl()
        self._scale_ins: dict[ObjKey, asyncio.Task[None]] = {}
        self._censuses: dict[tuple[ObjKey, str], _Census] = {}
        self._noted: dict[tuple[ObjKey, str, str], str] = {}  # (pool, tier, reason) -> last note posted

    async def run(self) -> None:
        """Every interval, group pools by broker; each broker polls on its own schedule (its own task),
        so a slow or hung broker delays only the pools that use it."""
        try:
            while True:
                started = self.clock()
                try:
                    await self._schedule()
                except Exception:  # one bad pass must not end autoscaling for every pool
                    log.exception("autoscaler pass failed")
                await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))
        finally:
            tasks = list(self._broker_tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._broker_tasks.clear()

    async def tick(self) -> None:
        """One pass over every broker at once (tests and benchmarks; `run` polls brokers independently)."""
        await self._schedule(start=False)
        await asyncio.gather(*(self._poll_broker(url) for url in list(self._groups)))

    def _group(self) -> dict[BrokerKey, list[_Entry]]:
        pools = dict(self.cache.pools)
        by_broker: dict[BrokerKey, list[_Entry]] = {}
        for key, body in pools.items():
            parsed = self._spec(key, body)
            runtime = self.cache.runtime[key]
            url = runtime.broker_url
            if parsed is None or url is None or body["metadata"].get("deletionTimestamp"):
                continue
            spec = parsed[0]
            options = ConnectOptions(runtime.broker_tls, spec.broker.master_name)
            by_broker.setdefault((url, options if options != ConnectOptions() else None), []).append(
                (key, body, *parsed)
            )
        return by_broker

    async def _schedule(self, *, start: bool = True) -> None:
        pools = self.cache.pools
        for gone in [k for k in self._specs if k not in pools]:
            self._specs.pop(gone, None)
            self._last_status.pop(gone, None)
            self._steady.pop(gone, None)
            self._owner_url.pop(f"{gone[0]}/{gone[1]}", None)
            self._forget_series(gone)
            await self.registry.release(f"{gone[0]}/{gone[1]}")
        # The awaited I/O is one read per broker, the rest is plain code (a coroutine per pool per
        # second costs more than the decisions themselves at fleet scale).
        self._groups = self._group()
        if not start:
            return
        for url, task in list(self._broker_tasks.items()):
            if task.done():
                del self._broker_tasks[url]
                self._pollers.pop(url, None)
                self._layout_due.pop(url, None)
        for url in self._groups:
            if url not in self._broker_tasks:
                self._broker_tasks[url] = asyncio.create_task(self._broker_loop(url), name="celery-fleet-broker")

    async def _broker_loop(self, url: BrokerKey) -> None:
        """Poll one broker every interval while pools use it; a read that takes longer only delays this loop."""
        while url in self._groups:
            started = self.clock()
            try:
                await self._poll_broker(url)
            except Exception:
                log.exception("autoscaler poll of broker %s failed", _display(url))
            await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))

    async def _poll_broker(self, url: BrokerKey) -> None:
        entries = self._groups.get(url)
        if not entries:
            return
        result = await self._read_broker(url, entries)
        actions: list[Coroutine[Any, Any, None]] = []
        for key, body, spec, refs in entries:
            current = self._specs.get(key)
            # Deleted or changed while the read was under way: the next read serves the new spec (and
            # acting on the old one would bring back the series of its removed tiers and queues).
            if key in self.cache.pools and current is not None and current[2] is refs:
                actions += self.scale_pool(key, body, spec, refs, result)
        if not isinstance(result, BrokerError):
            actions += await self._check_layout(url, entries)
        if actions:
            await asyncio.gather(*actions)

    async def _check_layout(self, url: BrokerKey, entries: list[_Entry]) -> list[Coroutine[Any, Any, None]]:
        """Now and then (not per poll), a bounded SCAN for priority lists the spec does not name."""
        now = self.clock()
        poller = self._pollers.get(url)
        check = getattr(poller.source, "check_layout", None) if poller is not None else None
        watched = frozenset(r for *_, refs in entries for rs in refs.values() for r in rs)
        due = self._layout_due.get(url)
        # Due every interval, and at once when the queues or their layout changed (a spec edit).
        if check is None or (due is not None and now < due[0] and due[1] == watched):
            return []
        self._layout_due[url] = (now + self.layout_check_interval, watched)
        log.debug("broker %s: checking the key layout of %d queues", _display(url), len(watched))
        try:
            found: Mapping[QueueRef, list[str]] = await check(watched)
        except BrokerError as err:
            log.warning("broker %s: key layout check failed: %s", _display(url), err)
            return []
        calls: list[Coroutine[Any, Any, None]] = []
        for key, body, _spec, refs in entries:
            mine = {r: found[r] for rs in refs.values() for r in rs if r in found}
            message = mismatch_message(mine)
            runtime = self.cache.runtime[key]
            if key not in self.cache.pools:
                continue
            if not runtime.layout_checked:
                runtime.layout_checked = True
                self.refresh_status(key)
            if message == runtime.layout_problem:
                continue
            ref = ObjectRef.from_body({**body, "apiVersion": POOL_API_VERSION, "kind": "CeleryWorkerPool"})
            if message is not None:
                log.warning("pool %s/%s: %s", key[0], key[1], message)
                calls.append(asyncio.to_thread(post_event, self.kube, ref, LAYOUT_MISMATCH, message, "Warning"))
            else:
                done = "every priority list on the broker is read"
                log.info("pool %s/%s: %s", key[0], key[1], done)
                calls.append(asyncio.to_thread(post_event, self.kube, ref, "BrokerKeyLayoutMatches", done))
            runtime.layout_problem = message
            self.refresh_status(key)
        return calls

    async def _read_broker(self, url: BrokerKey, entries: list[_Entry]) -> DepthReading | BrokerError:
        try:
            poller = None
            union: set[QueueRef] = set()
            for key, _body, _spec, refs in entries:
                owner = f"{key[0]}/{key[1]}"
                # Registering is needed once per owner (and when its URL changes); one poller per URL.
                if poller is None or self._owner_url.get(owner) != url:
                    poller = await self.registry.poller_for(owner, url[0], url[1])
                    self._owner_url[owner] = url
                tier_refs = [r for rs in refs.values() for r in rs]
                poller.want(owner, tier_refs)
                union.update(tier_refs)
            assert poller is not None
            first = f"{entries[0][0][0]}/{entries[0][0][1]}"
            self._pollers[url] = poller
            reading = await poller.read(first, union)
        except BrokerError as err:
            return err
        if id(reading) != self._last_reading.get(id(poller)):
            self._last_reading[id(poller)] = id(reading)
            metrics.POLL_SECONDS.observe(reading.duration_seconds)
        return reading

    def _spec(
        self, key: ObjKey, body: Mapping[str, Any]
    ) -> tuple[CeleryWorkerPoolSpec, dict[str, list[QueueRef]]] | None:
        # By uid too: a pool deleted and created again under its name starts at generation 1 again.
        version = (str(body["metadata"].get("uid", "")), int(body["metadata"].get("generation", 0)))
        cached = self._specs.get(key)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        try:
            spec = parse_pool(body)
        except InvalidSpec:
            return None  # the reconciler reports it as Degraded
        b = spec.broker
        layout = KeyLayout(b.global_keyprefix, b.sep, b.unacked_key, b.ack_emulation, tuple(sorted(b.fanout_exchanges)))
        refs = {t.name: queue_refs(t.queues, priority_steps=b.priority_steps, layout=layout) for t in spec.tiers}
        if cached is not None:
            self._forget_series(key, keep=refs)
        self._specs[key] = (version, spec, refs)
        return spec, refs

    def _forget_series(self, key: ObjKey, keep: Mapping[str, list[QueueRef]] | None = None) -> None:
        """Remove the pool's metric series (a deleted pool), or those of its tiers and queues not in `keep`."""
        namespace, pool = key
        if keep is None:
            metrics.forget_pool(namespace, pool)
            self._gauges.pop(key, None)
            return
        queues = {tier: {r.name for r in refs} for tier, refs in keep.items()}
        old = self._specs.get(key)
        for tier, old_refs in (old[2] if old else {}).items():
            if tier not in queues:
                metrics.forget_pool(namespace, pool, tier=tier)
                continue
            for queue in {r.name for r in old_refs} - queues[tier]:
                metrics.forget_pool(namespace, pool, tier=tier, queue=queue)

        def kept(labels: tuple[Any, ...]) -> bool:  # (id(gauge), namespace, pool[, tier[, queue, ...]])
            return len(labels) <= 3 or (labels[3] in queues and (len(labels) <= 4 or labels[4] in queues[labels[3]]))

        self._gauges[key] = {labels: v for labels, v in self._gauges.get(key, {}).items() if kept(labels)}

    def _max_replicas(self, key: ObjKey, tier: str) -> int:
        cached = self._specs.get(key)
        spec = cached[1] if cached else None
        return next((t.replicas.max for t in spec.tiers if t.name == tier), 0) if spec else 0

    def _gauge(self, gauge: Any, labels: tuple[str, ...], value: float) -> None:
        """Set a pool's gauge (labels start with namespace, pool) if its value changed."""
        written = self._gauges.setdefault((labels[0], labels[1]), {})
        k = (id(gauge), *labels)
        if written.get(k) != value:
            written[k] = value
            gauge.labels(*labels).set(value)

    def scale_pool(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        spec: CeleryWorkerPoolSpec,
        refs: dict[str, list[QueueRef]],
        result: DepthReading | BrokerError,
    ) -> list[Coroutine[Any, Any, None]]:
        """Observe, decide and settle one pool; returns the API calls to make (scales, Events)."""
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
            self._record_depth(namespace, name, refs, reading)
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
        now = self.clock()
        signature = (
            int(body["metadata"].get("generation", 0)),
            tuple(observations.get(t.name) for t in spec.tiers),
            tuple(current.values()),
        )
        steady = self._steady.get(key)
        if steady is not None and steady.signature == signature and now - steady.decided_at < FULL_DECIDE_SECONDS:
            # Same inputs as a decision that changed nothing: it would decide the same again.
            steady.skipped_at = now
            if now - self._last_status.get(key, 0.0) >= STATUS_REFRESH_SECONDS:
                self._last_status[key] = now
            return []
        histories = dict(runtime.history)
        if steady is not None and steady.skipped_at is not None:
            # The skipped polls each recommended the steady count: keep that in the stabilization window.
            for tier, replicas in steady.replicas.items():
                h = histories.get(tier)
                if h is not None:
                    histories[tier] = replace(
                        h, recommendations=(*h.recommendations, Recommendation(steady.skipped_at, replicas))
                    )
        decisions = decide(
            spec.tiers,
            observations,
            current,
            histories,
            now=now,
            max_total_replicas=spec.max_total_replicas,
            paused=spec.paused,
        )
        if key in self._scale_ins:
            return []  # that pool's workers are being asked; its decision follows from their answer
        asking = [d.tier for d in decisions if d.asks_workers] if broker_problem is None else []
        if asking:
            cached = self._reusable_censuses(key, asking, observations, now)
            if cached is not None:
                again = decide(
                    spec.tiers, observations, current, histories, now=now,
                    max_total_replicas=spec.max_total_replicas, paused=spec.paused, workers=cached,
                )  # fmt: skip
                if not any(d.tier in cached and d.desired < (d.current or 0) for d in again):
                    self._steady.pop(key, None)
                    return self._act(key, body, runtime, again, broker_problem, tier_problem)
            task = asyncio.get_running_loop().create_task(
                self._scale_in(key, body, spec, observations, current, histories, now, asking, tier_problem)
            )
            self._scale_ins[key] = task
            task.add_done_callback(lambda _t, k=key: self._scale_ins.pop(k, None))  # type: ignore[misc]
            self._steady.pop(key, None)
            return []
        if (
            not broker_problem
            and not tier_problem
            and all(
                d.reason is Reason.STEADY and d.current is not None and d.desired == d.current == d.recommended
                for d in decisions
            )
        ):
            self._steady[key] = _Steady(signature, {d.tier: d.desired for d in decisions}, decided_at=now)
        else:
            self._steady.pop(key, None)
        return self._act(key, body, runtime, decisions, broker_problem, tier_problem)

    def _record_depth(
        self, namespace: str, pool: str, refs: Mapping[str, list[QueueRef]], reading: DepthReading
    ) -> None:
        self._gauge(metrics.BROKER_UP, (namespace, pool), 1)
        for tier, tier_refs in refs.items():
            for ref in tier_refs:
                for step, n in reading.queued.get(ref, {}).items():
                    self._gauge(metrics.QUEUE_DEPTH, (namespace, pool, tier, ref.name, str(step)), n)
                in_flight = reading.in_flight.get((ref.layout, ref.name), 0)
                self._gauge(metrics.IN_FLIGHT, (namespace, pool, tier, ref.name), in_flight)

    async def _scale_tier(
        self, key: ObjKey, ref: ObjectRef, d: Decision, previous: TierScaling, removal: _Removal | None = None
    ) -> None:
        namespace, name = key
        runtime = self.cache.runtime[key]
        drained: set[str] = set()
        if removal is not None:
            drained = await self._prepare_removal(key, d.tier, removal)
        try:
            await asyncio.to_thread(self.kube.scale, namespace, tier_child_name(name, d.tier), d.desired)
        except ApiError as err:
            log.warning("pool %s/%s: could not scale tier %s: %s", namespace, name, d.tier, err)
            self._steady.pop(key, None)
            if removal is not None and drained:
                await self._undrain(key, d.tier, removal, drained, "the scale failed")
            return
        self._censuses.pop((key, d.tier), None)
        if removal is not None and drained:
            asyncio.get_running_loop().create_task(self._check_drained(key, d.tier, removal, drained))
        runtime.history[d.tier] = d.history  # only once the replicas were written
        runtime.desired[d.tier] = d.desired
        runtime.scaling[d.tier] = TierScaling(
            desired_replicas=d.desired,
            queue_depth=d.queue_depth if d.queue_depth is not None else previous.queue_depth,
            in_flight=d.in_flight if d.in_flight is not None else previous.in_flight,
            last_scale_time=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            last_scale_reason=d.message,
            scheduled=d.scheduled if d.scheduled is not None else previous.scheduled,
            busy_workers=d.busy_workers if d.busy_workers is not None else previous.busy_workers,
        )
        direction = "ScaledUp" if d.direction is Direction.UP else "ScaledDown"
        metrics.SCALING_DECISIONS.labels(namespace, name, d.tier, d.direction.value, d.reason.value).inc()
        log.info("pool %s/%s: %s", namespace, name, d.message)
        self._last_status[key] = self.clock()
        self.refresh_status(key)
        await asyncio.to_thread(post_event, self.kube, ref, direction, d.message)

    def _act(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        runtime: PoolRuntime,
        decisions: tuple[Decision, ...],
        broker_problem: tuple[str, str] | None,
        tier_problem: tuple[str, str] | None = None,
        removals: Mapping[str, _Removal] | None = None,
    ) -> list[Coroutine[Any, Any, None]]:
        namespace, name = key
        ref = ObjectRef.from_body({**body, "apiVersion": POOL_API_VERSION, "kind": "CeleryWorkerPool"})
        calls: list[Coroutine[Any, Any, None]] = []
        urgent = False
        removals = removals or {}
        for d in decisions:
            previous = runtime.scaling.get(d.tier, TierScaling())
            last_time, last_reason = previous.last_scale_time, previous.last_scale_reason
            if d.reason is Reason.BUSY_WORKERS and d.desired == d.current:
                calls += self._note_once(key, ref, d.tier, "ScaleDownHeld", d.message)
            if d.current is not None and d.desired != d.current and not (broker_problem and d.desired < d.current):
                calls.append(self._scale_tier(key, ref, d, previous, removals.get(d.tier)))
                self._gauge(metrics.DESIRED_REPLICAS, (namespace, name, d.tier), d.desired)
                continue
            runtime.history[d.tier] = d.history
            if d.current is None:
                runtime.desired[d.tier] = d.desired
            scaling = TierScaling(
                desired_replicas=d.desired,
                queue_depth=d.queue_depth if d.queue_depth is not None else previous.queue_depth,
                in_flight=d.in_flight if d.in_flight is not None else previous.in_flight,
                last_scale_time=last_time,
                last_scale_reason=last_reason,
                scheduled=d.scheduled if d.scheduled is not None else previous.scheduled,
                busy_workers=d.busy_workers if d.busy_workers is not None else previous.busy_workers,
            )
            if (scaling.desired_replicas, scaling.scheduled, scaling.busy_workers) != (
                previous.desired_replicas,
                previous.scheduled,
                previous.busy_workers,
            ):
                urgent = True
            runtime.scaling[d.tier] = scaling
            self._gauge(metrics.DESIRED_REPLICAS, (namespace, name, d.tier), d.desired)
            self._gauge(metrics.MAX_REPLICAS, (namespace, name, d.tier), self._max_replicas(key, d.tier))
            if d.current is not None:
                self._gauge(metrics.CURRENT_REPLICAS, (namespace, name, d.tier), d.current)

        problem = broker_problem or tier_problem
        if problem != runtime.broker_problem:
            urgent = True
            if problem is not None:
                if broker_problem is not None:
                    self._gauge(metrics.BROKER_UP, (namespace, name), 0)
                log.warning("pool %s/%s: %s", namespace, name, problem[1])
                calls.append(asyncio.to_thread(post_event, self.kube, ref, problem[0], problem[1], "Warning"))
            elif runtime.broker_problem is not None:
                message = "the broker answers again; autoscaling resumed"
                calls.append(asyncio.to_thread(post_event, self.kube, ref, "BrokerReachable", message))
            runtime.broker_problem = problem
        now = self.clock()
        if urgent or now - self._last_status.get(key, 0.0) >= STATUS_REFRESH_SECONDS:
            self._last_status[key] = now
            self.refresh_status(key)
        return calls

    # -- scale-in: ask the workers, choose idle pods, drain, then scale (see the module docstring)

    def _reusable_censuses(
        self, key: ObjKey, tiers: list[str], observations: Mapping[str, TierObservation], now: float
    ) -> dict[str, TierWorkers] | None:
        out: dict[str, TierWorkers] = {}
        for tier in tiers:
            c = self._censuses.get((key, tier))
            if c is None or now - c.workers.at >= CENSUS_REUSE_SECONDS or c.observation != observations.get(tier):
                return None
            out[tier] = c.workers
        return out

    def _tier_pods(self, namespace: str, pool: str, tier: str) -> dict[str, dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in tier_selector_labels(pool, tier).items())
        pods = self.kube.list("v1", "Pod", namespace, label_selector=selector)
        live = {
            str(p["metadata"]["name"]): p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        }
        return dict(sorted(live.items())[:MAX_CENSUS_PODS])

    async def _scale_in(
        self,
        key: ObjKey,
        body: Mapping[str, Any],
        spec: CeleryWorkerPoolSpec,
        observations: Mapping[str, TierObservation],
        current: Mapping[str, int | None],
        histories: Mapping[str, Any],
        now: float,
        asking: list[str],
        tier_problem: tuple[str, str] | None,
    ) -> None:
        namespace, name = key
        runtime = self.cache.runtime[key]
        url = runtime.broker_url
        if url is None:
            return
        ref = ObjectRef.from_body({**body, "apiVersion": POOL_API_VERSION, "kind": "CeleryWorkerPool"})
        target = ControlTarget(url, spec.broker.global_keyprefix, spec.broker.master_name)
        tiers = {t.name: t for t in spec.tiers}
        censuses: dict[str, TierWorkers] = {}
        lives: dict[str, dict[str, dict[str, Any]]] = {}
        notes: list[Coroutine[Any, Any, None]] = []
        try:
            for tier in asking:
                try:
                    pods = await asyncio.to_thread(self._tier_pods, namespace, name, tier)
                except ApiError as err:
                    # Without the pods nobody can be asked: no scale-in this time (the next poll retries).
                    log.warning("pool %s/%s: cannot list the pods of tier %s: %s", namespace, name, tier, err)
                    return
                ready = [p for p, pod in pods.items() if _pod_ready(pod)]
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
                censuses[tier] = workers
                lives[tier] = pods
                self._censuses[(key, tier)] = _Census(workers, observations[tier], tuple(pods))
                self._gauge(metrics.BUSY_WORKERS, (namespace, name, tier), len(workers.busy))
                self._gauge(metrics.SCHEDULED_TASKS, (namespace, name, tier), workers.scheduled)
                mute = workers.without_remote_control
                if mute:
                    message = (
                        f"tier {tier}: {len(mute)} worker(s) cannot be asked what they run (no remote-control "
                        f"mailbox, or the broker refused the command: {', '.join(w.pod for w in mute[:5])}); "
                        "scale-in cannot protect busy workers. Enable worker_enable_remote_control (and keep "
                        "the default control_exchange)."
                    )
                    notes += self._note_once(key, ref, tier, "RemoteControlOff", message, "remote-control-off",
                                             "Warning")  # fmt: skip
            decisions = decide(
                spec.tiers, observations, current, histories, now=now,
                max_total_replicas=spec.max_total_replicas, paused=spec.paused, workers=censuses,
            )  # fmt: skip
            removals: dict[str, _Removal] = {}
            for d in decisions:
                if d.tier in censuses and d.current is not None and d.desired < d.current:
                    workers_ = censuses[d.tier].workers
                    going = max(0, min(d.current - d.desired, len(workers_) - d.desired))
                    plan = plan_removal(workers_, len(workers_) - going)
                    removals[d.tier] = _Removal(plan, target, tuple(tiers[d.tier].queues), lives[d.tier])
            calls = notes + self._act(key, body, runtime, decisions, None, tier_problem, removals)
            if calls:
                await asyncio.gather(*calls)
        except Exception:  # one pool's failed scale-in must not end autoscaling
            log.exception("pool %s/%s: scale-in failed", namespace, name)

    def _set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        self.kube.request(
            "PATCH",
            resource_path("v1", "Pod", namespace, pod),
            body={"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}},
            content_type="application/merge-patch+json",
        )

    async def _prepare_removal(self, key: ObjKey, tier: str, removal: _Removal) -> set[str]:
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
            *(asyncio.to_thread(self._set_deletion_cost, namespace, pod, cost) for pod, cost in changes),
            return_exceptions=True,
        )
        failed = [pod for (pod, _), r in zip(changes, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            # The ReplicaSet controller may then take other pods: drain nobody, rely on warm shutdown.
            log.warning("pool %s/%s: could not set pod-deletion-cost on %s", namespace, name, ", ".join(failed))
            return set()
        victims = [p for p in removal.plan.remove if _pod_ready(removal.live.get(p, {}))]
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

    async def _undrain(self, key: ObjKey, tier: str, removal: _Removal, pods: set[str], why: str) -> None:
        namespace, name = key
        try:
            await self.control.add_consumer(removal.target, sorted(pods), removal.queues)
        except ControlError as err:
            log.warning("pool %s/%s: could not resume %s: %s", namespace, name, ", ".join(sorted(pods)), err)
            return
        log.info("pool %s/%s: tier %s: %s consume again (%s)", namespace, name, tier, ", ".join(sorted(pods)), why)

    async def _check_drained(self, key: ObjKey, tier: str, removal: _Removal, drained: set[str]) -> None:
        """Drained pods must go; any still live after DRAIN_CHECK_SECONDS consumes again."""
        namespace, name = key
        deadline = self.clock() + DRAIN_CHECK_SECONDS
        left = set(drained)
        try:
            while left:
                await asyncio.sleep(1.0)
                pods = await asyncio.to_thread(self._tier_pods, namespace, name, tier)
                left &= set(pods)
                if left and self.clock() >= deadline:
                    await self._undrain(key, tier, removal, left, "still running after the scale-in")
                    return
        except ApiError as err:
            log.warning("pool %s/%s: cannot check drained pods of tier %s: %s", namespace, name, tier, err)
            await self._undrain(key, tier, removal, left, "their removal could not be checked")
        except Exception:
            log.exception("pool %s/%s: checking drained pods of tier %s failed", namespace, name, tier)

    def _note_once(
        self, key: ObjKey, ref: ObjectRef, tier: str, reason: str, message: str, dedupe: str | None = None,
        type_: str = "Normal",
    ) -> list[Coroutine[Any, Any, None]]:  # fmt: skip
        """An Event the first time (and whenever `dedupe`, default the message, changes)."""
        k = (key, tier, reason)
        mark = dedupe if dedupe is not None else message
        if self._noted.get(k) == mark:
            return []
        self._noted[k] = mark
        if type_ == "Warning":
            log.warning("pool %s/%s: %s", key[0], key[1], message)
        return [asyncio.to_thread(post_event, self.kube, ref, reason, message, type_)]  # type: ignore[arg-type]


# A tier never has more pods than replicas.max allows; more listed pods are somebody else's doing.
MAX_CENSUS_PODS = 1000


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions if isinstance(c, dict))
