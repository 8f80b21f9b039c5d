"""The autoscaler loop: every poll, read each broker once (one pipelined read shared by the pools
that use it) and hand each pool its reading (:mod:`.pool` decides and acts). Each broker polls in
its own task, so a slow or hung broker delays only its pools; now and then a bounded scan checks
each broker's key layout against the specs."""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from celery_fleet import metrics
from celery_fleet.api.models import CeleryWorkerPoolSpec, InvalidSpec, parse_pool
from celery_fleet.api.sharing import ModelTable, share_submodels
from celery_fleet.brokers.control import PidboxControl, WorkerControl
from celery_fleet.brokers.destination import guard
from celery_fleet.brokers.layout import mismatch_message
from celery_fleet.brokers.poller import BrokerPoller, BrokerRegistry
from celery_fleet.brokers.redis.connection import ConnectOptions, connect
from celery_fleet.brokers.redis.target import RedisTarget
from celery_fleet.brokers.source import (
    BrokerError,
    DepthReading,
    KeyLayout,
    QueueDepthSource,
    QueueRef,
    queue_refs,
    unconsumed_refs,
)
from celery_fleet.handlers.autoscaler.pool import PoolScaler
from celery_fleet.handlers.autoscaler.scale_in import ScaleIn
from celery_fleet.handlers.autoscaler.signals import EventNotes, PoolSeries
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.handlers.pool_reconciler import pool_ref
from celery_fleet.kube.client import Kube
from celery_fleet.kube.events import EventPoster, post_event
from celery_fleet.planning.broker_policy import BrokerPolicy
from celery_fleet.planning.pool_status import queues_consumed

log = logging.getLogger(__name__)

# How often each broker's keyspace is scanned (bounded) for priority lists the spec does not name.
LAYOUT_CHECK_SECONDS = 60.0
LAYOUT_RECHECK_SECONDS = 5.0
LAYOUT_MISMATCH = "BrokerKeyLayoutMismatch"

_Entry = tuple[ObjKey, Mapping[str, Any], CeleryWorkerPoolSpec, dict[str, list[QueueRef]]]


# A broker is its URL and its TLS settings (two pools on one URL with different CAs poll apart).
BrokerKey = tuple[str, ConnectOptions | None]


def _connect(
    url: str, options: ConnectOptions | None = None, *, policy: BrokerPolicy | None = None
) -> QueueDepthSource:
    options = options or ConnectOptions()
    # No socket is opened here; the guard checks the destinations before the first read does.
    return guard(connect(url, tls=options.tls, master_name=options.master_name), url, policy)


def _display(broker: str | BrokerKey) -> str:
    url = broker if isinstance(broker, str) else broker[0]
    try:
        return RedisTarget.parse(url).display
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
        events: EventPoster | None = None,
        broker_policy: BrokerPolicy | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.refresh_status = refresh_status
        self.interval = interval
        self.clock = clock
        # `is None`, not `or`: an empty registry has len() 0 and is falsy.
        connect_to = functools.partial(_connect, policy=broker_policy)
        self.registry = (
            registry if registry is not None else BrokerRegistry(connect_to, max_age=interval / 2, display=_display)
        )
        self._specs: dict[ObjKey, tuple[tuple[str, int], CeleryWorkerPoolSpec, dict[str, list[QueueRef]]]] = {}
        self._last_reading: dict[int, int] = {}
        self._invalid: dict[ObjKey, tuple[str, int]] = {}  # pools whose spec at that version does not parse
        self._models = ModelTable()  # the specs kept here share their equal parts
        self._owner_url: dict[str, BrokerKey] = {}
        self._groups: dict[BrokerKey, list[_Entry]] = {}
        self._grouped: dict[ObjKey, tuple[Any, ...]] = {}  # key -> (body, url, tls, broker, entry) last grouped
        self._registered: dict[BrokerKey, tuple[list[_Entry], frozenset[QueueRef]]] = {}  # entries, their queues
        self._pollers: dict[BrokerKey, BrokerPoller] = {}
        # Per broker, for its entries (by identity): each pool's queues that no tier on the broker consumes.
        self._unconsumed: dict[BrokerKey, tuple[list[_Entry], dict[ObjKey, list[QueueRef]]]] = {}
        self._layout_due: dict[BrokerKey, tuple[float, frozenset[QueueRef], float]] = {}  # due, watched, checked
        self.layout_check_interval = layout_check_interval
        self._broker_tasks: dict[BrokerKey, asyncio.Task[None]] = {}
        self.control: WorkerControl = control or PidboxControl(policy=broker_policy)
        self.series = PoolSeries()
        notes = EventNotes(kube)
        self.scale_in = ScaleIn(kube, self.control, clock, notes)
        self.pools = PoolScaler(
            kube, cache, refresh_status, clock, self.series, self.scale_in, notes, self._max_replicas, events
        )

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
        """The pools by broker. A broker whose pools are all as before keeps its very list, so the poll
        can tell by identity that its queues need not be registered and united again."""
        pools = dict(self.cache.pools)
        by_broker: dict[BrokerKey, list[_Entry]] = {}
        memo: dict[ObjKey, tuple[Any, ...]] = {}
        for key, body in pools.items():
            runtime = self.cache.runtime[key]
            url, tls = runtime.broker_url, runtime.broker_tls
            last = self._grouped.get(key)
            if last is not None and last[0] is body and last[1] == url and last[2] == tls:
                memo[key] = last  # the same body (cache entries are replaced, never changed) and broker
                by_broker.setdefault(last[3], []).append(last[4])
                continue
            parsed = self._spec(key, body)
            if parsed is None or url is None or body["metadata"].get("deletionTimestamp"):
                continue
            spec = parsed[0]
            options = ConnectOptions(tls, spec.broker.master_name)
            broker = (url, options if options != ConnectOptions() else None)
            entry = (key, body, *parsed)
            memo[key] = (body, url, tls, broker, entry)
            by_broker.setdefault(broker, []).append(entry)
        self._grouped = memo
        for broker, entries in by_broker.items():
            before = self._groups.get(broker)
            if before is not None and len(before) == len(entries) and all(map(operator.is_, before, entries)):
                by_broker[broker] = before
        return by_broker

    async def _schedule(self, *, start: bool = True) -> None:
        pools = self.cache.pools
        for gone in [k for k in self._invalid if k not in pools]:
            del self._invalid[gone]
        for gone in [k for k in self._specs if k not in pools]:
            self._specs.pop(gone, None)
            self.pools.forget(gone)
            self._owner_url.pop(f"{gone[0]}/{gone[1]}", None)
            self.series.forget(gone)
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
                self._unconsumed.pop(url, None)
                self._registered.pop(url, None)
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
                actions += self.pools.scale_pool(key, body, spec, refs, result)
        if not isinstance(result, BrokerError):
            actions += self._note_unconsumed(url, entries, result)
            actions += await self._check_layout(url, entries)
        if actions:
            await asyncio.gather(*actions)

    def _unconsumed_of(self, url: BrokerKey, entries: list[_Entry]) -> dict[ObjKey, list[QueueRef]]:
        """Each pool's refs of Celery's default queue where no tier of any pool on the broker consumes it."""
        known = self._unconsumed.get(url)
        if known is not None and known[0] is entries:
            return known[1]
        consumed = {(r.layout, r.name) for *_, refs in entries for rs in refs.values() for r in rs}
        found = {
            key: [r for r in unconsumed_refs(refs) if (r.layout, r.name) not in consumed]
            for key, _body, _spec, refs in entries
        }
        self._unconsumed[url] = (entries, found)
        return found

    def _note_unconsumed(
        self, url: BrokerKey, entries: list[_Entry], reading: DepthReading
    ) -> list[Coroutine[Any, Any, None]]:
        """Messages waiting where no tier consumes them: the pool's condition, and an Event when that starts or ends."""
        calls: list[Coroutine[Any, Any, None]] = []
        unconsumed = self._unconsumed_of(url, entries)
        for key, body, _spec, _refs in entries:
            runtime = self.cache.runtime[key]
            waiting = {r.name: reading.depth(r) for r in unconsumed.get(key, ()) if r in reading.queued}
            if key not in self.cache.pools or waiting == runtime.unconsumed:
                continue
            first, before = runtime.unconsumed is None, {q for q, n in (runtime.unconsumed or {}).items() if n > 0}
            runtime.unconsumed = waiting
            after = {q for q, n in waiting.items() if n > 0}
            if not (first and not after):  # a first "nothing waits" rides on the first decision's status write
                self.refresh_status(key)
            if before == after:
                continue  # only depths changed: the condition's message follows, no Event per poll
            update = queues_consumed(waiting, list(waiting))
            ref = pool_ref(body)
            if after:
                log.warning("pool %s/%s: %s", key[0], key[1], update.message)
                calls.append(asyncio.to_thread(post_event, self.kube, ref, update.reason, update.message, "Warning"))
            else:
                calls.append(asyncio.to_thread(post_event, self.kube, ref, update.reason, update.message))
        return calls

    async def _check_layout(self, url: BrokerKey, entries: list[_Entry]) -> list[Coroutine[Any, Any, None]]:
        """Now and then (not per poll), a bounded SCAN for priority lists the spec does not name."""
        now = self.clock()
        poller = self._pollers.get(url)
        check = getattr(poller.source, "check_layout", None) if poller is not None else None
        registered = self._registered.get(url)
        watched = (
            registered[1]
            if registered is not None and registered[0] is entries
            else frozenset(r for *_, refs in entries for rs in refs.values() for r in rs)
        )
        due = self._layout_due.get(url)
        # Due every interval, and soon when the queues or their layout changed (a spec edit); while
        # pools keep arriving (a rollout) at most every LAYOUT_RECHECK_SECONDS, not on every poll.
        if check is None or (
            due is not None and now < due[0] and (due[1] == watched or now - due[2] < LAYOUT_RECHECK_SECONDS)
        ):
            return []
        self._layout_due[url] = (now + self.layout_check_interval, watched, now)
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
            ref = pool_ref(body)
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
            first = f"{entries[0][0][0]}/{entries[0][0][1]}"
            registered = self._registered.get(url)
            poller = self._pollers.get(url)
            if registered is not None and registered[0] is entries and poller is not None:
                union = registered[1]  # the same pools as the last poll: registered, their queues known
            else:
                poller = None
                queues: set[QueueRef] = set()
                for key, _body, _spec, refs in entries:
                    owner = f"{key[0]}/{key[1]}"
                    # Registering is needed once per owner (and when its URL changes); one poller per URL.
                    if poller is None or self._owner_url.get(owner) != url:
                        poller = await self.registry.poller_for(owner, url[0], url[1])
                        self._owner_url[owner] = url
                    # Celery's default queue too, where no tier of the pool consumes it (unrouted work).
                    tier_refs = [r for rs in refs.values() for r in rs] + unconsumed_refs(refs)
                    poller.want(owner, tier_refs)
                    queues.update(tier_refs)
                assert poller is not None
                union = frozenset(queues)
                self._registered[url] = (entries, union)
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
        if self._invalid.get(key) == version:
            return None  # parsing it again every poll would cost what every valid pool costs together
        try:
            spec = share_submodels(parse_pool(body), self._models)
        except InvalidSpec:
            self._invalid[key] = version
            return None  # the reconciler reports it as Degraded
        self._invalid.pop(key, None)
        b = spec.broker
        layout = KeyLayout(
            b.global_keyprefix, b.sep, b.unacked_key, b.ack_emulation, tuple(sorted(b.fanout_exchanges)),
            b.visibility_timeout_seconds,
        )  # fmt: skip
        refs = {t.name: queue_refs(t.queues, priority_steps=b.priority_steps, layout=layout) for t in spec.tiers}
        if cached is not None and cached[0][0] != version[0]:
            # Deleted and created again under its name between two passes: nothing of the old pool is
            # the new one's (its series, censuses, once-only notes, steady state).
            self.pools.forget(key)
            self.series.forget(key)
        elif cached is not None:
            self.series.forget(key, old=cached[2], keep=refs)
        self._specs[key] = (version, spec, refs)
        return spec, refs

    def _max_replicas(self, key: ObjKey, tier: str) -> int:
        cached = self._specs.get(key)
        spec = cached[1] if cached else None
        return next((t.replicas.max for t in spec.tiers if t.name == tier), 0) if spec else 0
