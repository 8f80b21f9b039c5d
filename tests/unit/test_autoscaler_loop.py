"""The autoscaler loop's decisions without a cluster or a Redis: one `tick` over a hand-filled
cache, a scripted queue-depth source and the recording API fake."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from celery_fleet.brokers import BrokerRegistry, DepthReading, QueueRef, UnackedSummary
from celery_fleet.brokers.source import BrokerError, ErrorKind, KeyLayout, QueueDepthSource
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache, ObjKey
from celery_fleet.kube.client import Kube
from tests.support.fake_api import RecordingApi

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


def _pool_with_tiers(cache: FleetCache, replicas: int) -> ObjKey:
    spec = {
        "app": "shop.celery:app",
        "image": "img:1",
        "broker": {"url": URL},
        "tiers": [{"name": "high", "queues": ["high_priority"], "concurrency": 4,
                   "replicas": {"min": 2, "max": 8}, "autoscaling": {"targetDepthPerReplica": 100}}],
    }  # fmt: skip
    meta = {"name": "shop", "namespace": "shop", "uid": UID, "generation": 1}
    key = cache.put_pool({"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": meta,
                          "spec": spec})  # fmt: skip
    cache.runtime[key].broker_url = URL
    put_tier_deployment(cache, replicas)
    return key


def put_tier_deployment(cache: FleetCache, replicas: int) -> None:
    """Pool shop's tier high Deployment (uid dep-uid), rolled out at `replicas`."""
    owner = {"kind": "CeleryWorkerPool", "name": "shop", "uid": UID, "controller": True}
    dep_meta = {"name": "shop-high", "namespace": "shop", "uid": "dep-uid", "ownerReferences": [owner],
                "labels": {POOL_LABEL: "shop", "celeryfleet.io/tier": "high"}}  # fmt: skip
    status = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas}
    cache.put_child(POOL_LABEL, {"kind": "Deployment", "metadata": dep_meta, "spec": {"replicas": replicas},
                                 "status": status})  # fmt: skip


def _tick(source: ScriptedSource, replicas: int) -> tuple[RecordingApi, FleetCache, ObjKey]:
    api = RecordingApi()
    cache = FleetCache()
    key = _pool_with_tiers(cache, replicas)

    def connect(url: str) -> QueueDepthSource:
        return source

    async def main() -> None:
        autoscaler = Autoscaler(
            Kube(api),  # type: ignore[arg-type]  # duck-typed ApiClient
            cache,
            refresh_status=lambda key: None,
            registry=BrokerRegistry(connect, max_age=0.0),
        )
        await autoscaler.tick()

    asyncio.run(main())
    return api, cache, key


def _scales(api: RecordingApi) -> list[tuple[str, Any]]:
    return [(path.split("/")[-2], body["spec"]["replicas"]) for (m, path, body) in api.writes
            if m == "PATCH" and path.endswith("/scale")]  # fmt: skip


def test_a_backlog_scales_the_tier_up_at_once() -> None:
    api, cache, key = _tick(ScriptedSource({"high_priority": 540}), replicas=2)
    assert _scales(api) == [("shop-high", 6)]  # ceil(540 / 100), within [2, 8]
    assert cache.runtime[key].desired["high"] == 6


def test_a_backlog_beyond_max_stops_at_max() -> None:
    api, _, _ = _tick(ScriptedSource({"high_priority": 5000}), replicas=2)
    assert _scales(api) == [("shop-high", 8)]


def test_a_failed_read_scales_nothing_and_is_reported() -> None:
    api, cache, key = _tick(ScriptedSource({}, fail=True), replicas=6)
    assert _scales(api) == []  # never scaled down because a read failed
    problem = cache.runtime[key].broker_problem
    assert problem is not None and "refused" in problem[1]
