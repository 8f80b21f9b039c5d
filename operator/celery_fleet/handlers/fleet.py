"""The operator's runtime: watch cache, work queues, reconcilers and the autoscaler loop."""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from celery_fleet import metrics
from celery_fleet.api.models import API_VERSION, BEAT_KIND, POOL_KIND
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.beat_reconciler import BeatReconciler
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.handlers.pool_reconciler import Outcome, PoolReconciler
from celery_fleet.handlers.workqueue import WorkQueue
from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.events import EventPoster
from celery_fleet.planning import sweep
from celery_fleet.planning.broker_policy import BrokerPolicy

log = logging.getLogger(__name__)

# Every watch event and apiserver answer is parsed JSON that is soon freed; glibc keeps freed memory
# in per-thread arenas (up to 8 per core) and returns little of it, so RSS grows with the rollout and
# stays there. Two arenas serve a process whose threads only wait on the apiserver; a trim now and
# then hands the freed pages back.
MALLOC_ARENAS = 2
MALLOC_TRIM_SECONDS = 60.0
_M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (musl, macOS): nothing to tune
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas() -> None:
    """Before the thread pools start: arenas are made per thread on first use."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


async def trim_malloc_periodically(interval: float = MALLOC_TRIM_SECONDS) -> None:
    libc = _libc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(libc.malloc_trim, 0)


# How often cached pools and beats are checked against a LIST (objects of a deleted namespace).
SWEEP_SECONDS = 300.0


@dataclass(frozen=True)
class FleetConfig:
    """Operator settings from the command line."""

    poll_interval: float = 1.0
    reconcile_workers: int = 4
    elector_image: str = "ghcr.io/celery-fleet/celery-fleet:0.1.0"
    broker_policy: BrokerPolicy | None = None  # None: every broker destination is allowed (library default)


@dataclass
class Fleet:
    kube: Kube
    config: FleetConfig = field(default_factory=FleetConfig)
    cache: FleetCache = field(default_factory=FleetCache)
    pool_queue: WorkQueue[ObjKey] = field(default_factory=WorkQueue)
    beat_queue: WorkQueue[ObjKey] = field(default_factory=WorkQueue)

    def __post_init__(self) -> None:
        # One Event poster (its threads and its backlog bound) for the reconcilers and the autoscaler.
        self.events = EventPoster(self.kube)
        self.pools = PoolReconciler(self.kube, self.cache, events=self.events)
        metrics.KUBE_REQUESTS.counts = lambda: dict(self.kube.requests_by)
        # Counted when scraped: counting every pool after every reconcile was O(pools) each time.
        metrics.POOLS.set_function(lambda: self.cache.counts()[0])
        metrics.TIERS.set_function(lambda: self.cache.counts()[1])
        metrics.BEATS.set_function(lambda: self.cache.counts()[2])
        self.beats = BeatReconciler(self.kube, self.cache, self.config.elector_image)
        self.autoscaler = Autoscaler(
            self.kube,
            self.cache,
            self.pool_queue.add,
            interval=self.config.poll_interval,
            events=self.events,
            broker_policy=self.config.broker_policy,
        )

    async def _reconcile(
        self, kind: str, reconcile: Callable[[ObjKey], Outcome], queue: WorkQueue[ObjKey], key: ObjKey
    ) -> None:
        try:
            outcome = await asyncio.to_thread(reconcile, key)
        except Exception:  # a bug must not stop the queue; the key is retried with backoff
            log.exception("%s %s/%s: reconcile crashed", kind, *key)
            metrics.RECONCILES.labels(kind, "crash").inc()
            queue.backoff(key)
            return
        if outcome.error:
            queue.backoff(key)
        else:
            queue.forget(key)
            if outcome.requeue_after:
                queue.add_after(key, outcome.requeue_after)

    async def _reconcile_pool(self, key: ObjKey) -> None:
        await self._reconcile("CeleryWorkerPool", self.pools.reconcile, self.pool_queue, key)

    async def _reconcile_beat(self, key: ObjKey) -> None:
        await self._reconcile("CeleryBeat", self.beats.reconcile, self.beat_queue, key)

    def sweep(self) -> list[ObjKey]:
        """Drop cached pools and beats that are gone though no DELETED event came (their namespace's
        watch stopped first: planning.sweep). One LIST per namespace and kind with cached objects;
        a failed LIST keeps them (unknown is not gone). Blocking: run it in a thread."""
        pools, beats = self.cache.uids()
        dropped: list[ObjKey] = []
        for kind, snapshot, drop, queue in (
            (POOL_KIND, pools, self.cache.drop_pool_if_uid, self.pool_queue),
            (BEAT_KIND, beats, self.cache.drop_beat_if_uid, self.beat_queue),
        ):
            for namespace in sorted({key[0] for key in snapshot}):
                try:
                    items = self.kube.list(API_VERSION, kind, namespace)
                except ApiError as err:
                    if err.status != 404:
                        log.warning("sweep of %s in %s: %s; kept", kind, namespace, err)
                        continue
                    items = []
                uids = [str((item.get("metadata") or {}).get("uid")) for item in items]
                for key in sweep.gone(snapshot, namespace, uids):
                    if drop(key, snapshot[key]):
                        log.info(
                            "%s %s/%s: gone without a DELETED event (its namespace deleted?), forgotten", kind, *key
                        )
                        dropped.append(key)
                        queue.add(key)  # its reconciler forgets the rest (status record, metrics)
        return dropped

    async def sweep_periodically(self, interval: float = SWEEP_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:  # a bug must not stop the sweep for good
                log.exception("sweep of deleted pools and beats crashed")

    async def run(self) -> None:
        limit_malloc_arenas()
        # Reconciles and scale calls use the blocking client in threads; asyncio's default pool
        # (cores + 4) would cap a 2-core operator at 6 concurrent apiserver calls.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.config.reconcile_workers * 2 + 4, thread_name_prefix="kube")
        )
        await asyncio.gather(
            self.pool_queue.run(self._reconcile_pool, self.config.reconcile_workers),
            self.beat_queue.run(self._reconcile_beat, 2),
            self.autoscaler.run(),
            trim_malloc_periodically(),
            self.sweep_periodically(),
        )
