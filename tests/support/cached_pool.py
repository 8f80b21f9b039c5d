"""Pool `shop/shop` with one tier, `high`, filled into a FleetCache by hand (as the watches would), with
its tier Deployment rolled out; and a scripted queue-depth source. For unit tests of the autoscaler."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from celery_fleet.brokers import DepthReading, QueueRef, UnackedSummary
from celery_fleet.brokers.source import BrokerError, ErrorKind, KeyLayout
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache, ObjKey

URL = "redis://redis.shop.svc:6379/0"
UID = "pool-uid"


class ScriptedSource:
    """A broker whose queues hold `depth` messages each, or whose reads fail."""

    def __init__(self, depth: dict[str, int], fail: bool = False) -> None:
        self.depth = depth
        self.fail = fail

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        if self.fail:
            raise BrokerError(ErrorKind.UNREACHABLE, "connection refused")
        queued = {r: {0: self.depth.get(r.name, 0)} for r in refs}
        return DepthReading(queued=queued, in_flight={}, unacked={KeyLayout(): UnackedSummary(0, 0)})

    async def aclose(self) -> None:
        return None


def put_pool(
    cache: FleetCache, *, rolled_out: int, replicas: Mapping[str, int], autoscaling: Mapping[str, Any]
) -> ObjKey:
    """Pool shop's spec (tier high on queue high_priority, concurrency 4, with these `replicas` bounds and
    `autoscaling`), its broker URL, and the tier Deployment at `rolled_out` replicas."""
    tier = {"name": "high", "queues": ["high_priority"], "concurrency": 4, "replicas": dict(replicas),
            "autoscaling": dict(autoscaling)}  # fmt: skip
    spec = {"app": "shop.celery:app", "image": "img:1", "broker": {"url": URL}, "tiers": [tier]}
    meta = {"name": "shop", "namespace": "shop", "uid": UID, "generation": 1}
    key = cache.put_pool({"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": meta,
                          "spec": spec})  # fmt: skip
    cache.runtime[key].broker_url = URL
    _put_tier_deployment(cache, rolled_out)
    return key


def _put_tier_deployment(cache: FleetCache, replicas: int) -> None:
    """Pool shop's tier high Deployment (uid dep-uid), rolled out at `replicas`."""
    owner = {"kind": "CeleryWorkerPool", "name": "shop", "uid": UID, "controller": True}
    dep_meta = {"name": "shop-high", "namespace": "shop", "uid": "dep-uid", "ownerReferences": [owner],
                "labels": {POOL_LABEL: "shop", "celeryfleet.io/tier": "high"}}  # fmt: skip
    status = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas}
    cache.put_child(POOL_LABEL, {"kind": "Deployment", "metadata": dep_meta, "spec": {"replicas": replicas},
                                 "status": status})  # fmt: skip
