"""What the autoscaler publishes besides replicas: each pool's metric series (written only when a
value changes) and Events posted once per (tier, reason) until their message changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from celery_fleet import metrics
from celery_fleet.brokers.source import DepthReading, QueueRef
from celery_fleet.handlers.cache import ObjKey
from celery_fleet.kube.client import Kube
from celery_fleet.kube.events import ObjectRef, post_event

log = logging.getLogger(__name__)


class PoolSeries:
    """The pools' gauges, written only when a value changes (`metrics.OwnedGauge`); a pool whose
    series reach their cap (`metrics.SeriesBudget`) is warned about once, the rest is counted."""

    def __init__(self) -> None:
        self._capped: set[ObjKey] = set()  # pools warned about: once each, until deleted

    def set(self, gauge: metrics.OwnedGauge, labels: tuple[str, ...], value: float) -> None:
        """Set a pool's gauge (labels start with namespace, pool) if its value changed."""
        if gauge.get(labels) != value and not gauge.set(labels, value):
            key = (labels[0], labels[1])
            if key not in self._capped:
                self._capped.add(key)
                budget = gauge.budget
                assert budget is not None  # only a budgeted gauge refuses
                log.warning(
                    "pool %s/%s: metric series left out (the pool holds %d per-queue series of at most %d, its "
                    "namespace at most %d series; see celery_fleet_metric_series_dropped_total and "
                    "--metrics-max-series-per-pool/-namespace)",
                    key[0], key[1], budget.held(key, capped=True), budget.per_pool, budget.per_namespace,
                )  # fmt: skip

    def forget(
        self,
        key: ObjKey,
        old: Mapping[str, list[QueueRef]] | None = None,
        keep: Mapping[str, list[QueueRef]] | None = None,
    ) -> None:
        """Remove the pool's series (a deleted pool: no `keep`), or those of its tiers and queues in
        `old` that are not in `keep`."""
        namespace, pool = key
        if keep is None:
            metrics.forget_pool(namespace, pool)
            self._capped.discard(key)
            return
        queues = {tier: {r.name for r in refs} for tier, refs in keep.items()}
        for tier, old_refs in (old or {}).items():
            if tier not in queues:
                metrics.forget_pool(namespace, pool, tier=tier)
                continue
            for queue in {r.name for r in old_refs} - queues[tier]:
                metrics.forget_pool(namespace, pool, tier=tier, queue=queue)

    def record_depth(
        self, namespace: str, pool: str, refs: Mapping[str, list[QueueRef]], reading: DepthReading
    ) -> None:
        self.set(metrics.BROKER_UP, (namespace, pool), 1)
        for tier, tier_refs in refs.items():
            for ref in tier_refs:
                for step, n in reading.queued.get(ref, {}).items():
                    self.set(metrics.QUEUE_DEPTH, (namespace, pool, tier, ref.name, str(step)), n)
                in_flight = reading.in_flight.get((ref.layout, ref.name), 0)
                self.set(metrics.IN_FLIGHT, (namespace, pool, tier, ref.name), in_flight)


class EventNotes:
    """Events that say a standing fact (a held scale-down, remote control off): posted once."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._noted: dict[tuple[ObjKey, str, str], str] = {}  # (pool, tier, reason) -> last note posted

    def forget(self, key: ObjKey) -> None:
        """A deleted pool: its notes go (a pool created again under the name is told again)."""
        for k in [k for k in self._noted if k[0] == key]:
            del self._noted[k]

    def once(
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
