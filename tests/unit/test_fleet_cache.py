"""Issue 15: the watch cache keeps what the reconcilers compare and forgets a deleted pool; an idle
pool whose broker answered as before is not observed again, and any change to it is."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from celery_fleet.brokers import BrokerRegistry, DepthReading, QueueRef, UnackedSummary
from celery_fleet.brokers.source import KeyLayout, QueueDepthSource
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache, SharedTrees
from celery_fleet.kube.client import Kube
from celery_fleet.planning.drift import has_drifted
from tests.support.fake_api import RecordingApi

OWNER = {"kind": "CeleryWorkerPool", "name": "shop", "uid": "pool-uid", "controller": True}


def _deployment(replicas: int = 2, **status: Any) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": "shop-high", "namespace": "shop", "uid": "dep-uid", "ownerReferences": [OWNER],
            "labels": {POOL_LABEL: "shop", "celeryfleet.io/tier": "high"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "payments"},
            "managedFields": [{"manager": "celery-fleet", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "worker", "image": "img:1"}]}}},
        "status": {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                   "conditions": [{"type": "Available", "status": "True", "message": "long text"}], **status},
    }  # fmt: skip


def test_children_keep_what_is_compared_and_drop_the_rest() -> None:
    cache = FleetCache()
    key = cache.put_child(POOL_LABEL, _deployment())
    assert key == ("shop", "shop")
    kept = cache.children_of(key)[("Deployment", "shop-high")]
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"team": "payments"}
    assert kept["status"] == {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    template = {"spec": {"containers": [{"name": "worker", "image": "img:1"}]}}
    desired = {"metadata": {"labels": {POOL_LABEL: "shop"}, "ownerReferences": [OWNER]},
               "spec": {"replicas": 2, "template": template}}  # fmt: skip
    assert not has_drifted(desired, kept)
    edited = _deployment()
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "img:hand-edited"
    cache.put_child(POOL_LABEL, edited)
    assert has_drifted(desired, cache.children_of(key)[("Deployment", "shop-high")])


def test_a_pdb_keeps_no_status() -> None:
    cache = FleetCache()
    pdb = {**_deployment(), "kind": "PodDisruptionBudget", "status": {"currentHealthy": 2, "conditions": []}}
    key = cache.put_child(POOL_LABEL, pdb)
    assert key is not None
    assert "status" not in cache.children_of(key)[("PodDisruptionBudget", "shop-high")]


def _pool(generation: int = 1) -> dict[str, Any]:
    spec = {
        "app": "shop.celery:app", "image": "img:1", "broker": {"url": "redis://r:6379/0"},
        "tiers": [{"name": "high", "queues": ["high_priority"], "concurrency": 4,
                   "replicas": {"min": 2, "max": 8}, "autoscaling": {"targetDepthPerReplica": 100}}],
    }  # fmt: skip
    meta = {"name": "shop", "namespace": "shop", "uid": "pool-uid", "generation": generation}
    return {"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": meta, "spec": spec}


def test_a_deleted_pool_leaves_nothing_behind() -> None:
    cache = FleetCache()
    key = cache.put_pool(_pool())
    cache.put_child(POOL_LABEL, _deployment())
    cache.runtime[key].broker_url = "redis://r:6379/0"
    v1 = cache.version(key)
    cache.put_child(POOL_LABEL, _deployment(replicas=3))
    assert cache.version(key) != v1  # a child's write changes the pool's version
    cache.drop_pool(key)
    assert (key in cache.pools, key in cache.runtime, key in cache.children, cache.version(key)) == (
        False, False, False, None,
    )  # fmt: skip
    cache.put_child(POOL_LABEL, _deployment(), deleted=True)  # the GC's DELETED event afterwards
    assert key not in cache.children


class CountingSource:
    """The same answer on every poll, with one revision, as the Redis source gives an idle broker
    (every queue changed at the current revision: a new answer changes them all)."""

    def __init__(self) -> None:
        self.depth = 0
        self.revision = 1

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        queued = {r: {0: self.depth} for r in refs}
        return DepthReading(queued=queued, in_flight={}, unacked={KeyLayout(): UnackedSummary(0, 0)},
                            revision=self.revision, changed_at={r: self.revision for r in refs})  # fmt: skip

    async def aclose(self) -> None:
        return None


def test_an_idle_pool_is_not_observed_again_until_something_changes(monkeypatch: Any) -> None:
    api, cache, source = RecordingApi(), FleetCache(), CountingSource()
    key = cache.put_pool(_pool())
    cache.runtime[key].broker_url = "redis://r:6379/0"
    cache.put_child(POOL_LABEL, _deployment(replicas=2))
    observed: list[int] = []

    def connect(url: str) -> QueueDepthSource:
        return source

    async def main() -> None:
        autoscaler = Autoscaler(Kube(api), cache, refresh_status=lambda key: None,  # type: ignore[arg-type]
                                registry=BrokerRegistry(connect, max_age=0.0))  # fmt: skip
        real = autoscaler.pools.series.record_depth
        monkeypatch.setattr(autoscaler.pools.series, "record_depth", lambda *a: (observed.append(1), real(*a)))
        for _ in range(3):
            await autoscaler.tick()
        assert len(observed) == 1  # decided once (steady); the same answer after that is not looked at
        cache.put_child(POOL_LABEL, _deployment(replicas=2))  # an event for a child (status, hand edit)
        await autoscaler.tick()
        assert len(observed) == 2
        source.depth, source.revision = 540, 2  # a backlog: a new answer from the broker
        await autoscaler.tick()
        assert len(observed) == 3
        # The scale's watch event has not arrived yet: the cache holds what was written, and the
        # next poll does not write it again.
        assert cache.children_of(key)[("Deployment", "shop-high")]["spec"]["replicas"] == 6
        await autoscaler.tick()

    asyncio.run(main())
    scales = [body["spec"]["replicas"] for m, path, body in api.writes if path.endswith("/scale")]
    assert scales == [6]  # ceil(540 / 100): the backlog was decided on at once, and written once


def test_an_invalid_pool_is_parsed_once_per_version(monkeypatch: Any) -> None:
    from celery_fleet.handlers.autoscaler import loop

    cache, parses = FleetCache(), []
    bad = _pool()
    bad["spec"]["broker"]["visibilityTimeout"] = 10  # unknown: the reconciler reports InvalidSpec
    key = cache.put_pool(bad)
    cache.runtime[key].broker_url = "redis://r:6379/0"
    real = loop.parse_pool
    monkeypatch.setattr(loop, "parse_pool", lambda body: (parses.append(1), real(body))[1])

    async def main() -> None:
        autoscaler = Autoscaler(Kube(RecordingApi()), cache, refresh_status=lambda key: None)  # type: ignore[arg-type]
        for _ in range(3):
            await autoscaler.tick()
        assert len(parses) == 1
        cache.put_pool(_pool(generation=2))  # fixed: parsed again, and valid
        await autoscaler.tick()
        assert len(parses) == 2 and key in autoscaler._specs

    asyncio.run(main())


def _template(image: str, queue: str) -> dict[str, Any]:
    probe = {"exec": {"command": ["python3", "-c", "long script " * 50]}, "periodSeconds": 10}
    container = {
        "name": "worker",
        "image": image,
        "args": ["-Q", queue],
        "readinessProbe": probe,
        "env": [{"name": "A", "value": "1"}],
        "ports": [{"containerPort": 1000, "protocol": "TCP"}],
    }
    return {"template": {"spec": {"containers": [container], "securityContext": {}}}}  # fmt: skip


def test_equal_subtrees_of_cached_objects_are_held_once() -> None:
    shared = SharedTrees()
    a, b = shared.copy(_template("img:1", "q1")), shared.copy(_template("img:1", "q2"))
    assert a == _template("img:1", "q1") and b == _template("img:1", "q2")  # copies, equal to what came in
    ca, cb = a["template"]["spec"]["containers"][0], b["template"]["spec"]["containers"][0]
    assert ca is not cb  # they differ in their args
    assert ca["readinessProbe"] is cb["readinessProbe"] and ca["env"] is cb["env"] and ca["ports"] is cb["ports"]
    assert a["template"]["spec"]["securityContext"] is b["template"]["spec"]["securityContext"]


def test_values_equal_across_types_are_not_shared() -> None:
    """1, 1.0 and True compare equal in Python; a cached object must keep what the apiserver sent."""
    shared = SharedTrees()
    kept = [shared.copy({"v": v}) for v in (1, 1.0, True, "1")]
    assert [type(k["v"]) for k in kept] == [int, float, bool, str]
    assert len({id(k) for k in kept}) == 4


def test_subtrees_only_one_object_held_leave_the_table() -> None:
    shared = SharedTrees()
    held = [shared.copy(_template("img:1", f"q{i}")) for i in range(3)]
    for i in range(3, 50):
        shared.copy(_template("img:1", f"q{i}"))  # dropped at once: nothing holds these
    shared._sweep()
    # Left: what the three held copies share (probe, env, ports...) and nothing of the dropped ones.
    assert 0 < len(shared) < 20
    again = shared.copy(_template("img:1", "q0"))
    assert (
        again["template"]["spec"]["containers"][0]["readinessProbe"]
        is (held[0]["template"]["spec"]["containers"][0]["readinessProbe"])
    )
