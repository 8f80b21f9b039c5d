"""Scale-in's state in a long-running operator, over the recording API fake and a scripted broker
and worker control: what one census keeps (censuses, notes, the RemoteControl condition's input)
and that a deleted pool leaves none of it behind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from celery_fleet.brokers import BrokerRegistry
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.kube.client import Kube
from celery_fleet.planning.scale_in import WorkerReport
from celery_fleet.workers.control import ControlTarget
from tests.support.cached_pool import ScriptedSource, put_pool
from tests.support.fake_api import RecordingApi

PODS = ("shop-high-rs-a", "shop-high-rs-b", "shop-high-rs-c")
IMMEDIATE = {"targetDepthPerReplica": 100, "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}


class TierApi(RecordingApi):
    """Answers the scale-in's LISTs: the tier's ReplicaSet (ours by uid) and its three Ready pods."""

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        super().call_api(path, method, **kwargs)
        meta = {"namespace": "shop"}
        if method == "GET" and path.endswith("/replicasets"):
            owner = {"kind": "Deployment", "name": "shop-high", "uid": "dep-uid", "controller": True}
            return {"items": [{"metadata": {**meta, "name": "shop-high-rs", "uid": "rs-uid",
                                            "ownerReferences": [owner]}}]}, 200, {}  # fmt: skip
        if method == "GET" and path.endswith("/pods"):
            owner = {"kind": "ReplicaSet", "name": "shop-high-rs", "uid": "rs-uid", "controller": True}
            ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
            items = [{"metadata": {**meta, "name": p, "ownerReferences": [owner]}, "status": ready} for p in PODS]
            return {"items": items}, 200, {}
        return {}, 200, {}


class ScriptedWorkers:
    """The tier's workers: `mute` (remote control off: no answer, no mailbox), idle, or busy."""

    def __init__(self, mode: str = "mute") -> None:
        self.broadcasts = 0
        self.mode = mode

    async def census(self, target: ControlTarget, pods: Sequence[str]) -> dict[str, WorkerReport]:
        if self.mode == "mute":
            return {p: WorkerReport(p, answered=False, remote_control=False) for p in pods}
        return {p: WorkerReport(p, active=1 if self.mode == "busy" else 0) for p in pods}

    async def cancel_consumer(self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str]) -> set[str]:
        return set()

    async def add_consumer(self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str]) -> set[str]:
        return set()


def _pool(cache: FleetCache, replicas: int) -> ObjKey:
    """Tier high at `replicas`, scaled down as soon as it is idle (no stabilization, no cooldown)."""
    return put_pool(cache, rolled_out=replicas, replicas={"min": 0, "max": 8}, autoscaling=IMMEDIATE)


def _autoscaler(cache: FleetCache, control: ScriptedWorkers, refreshed: list[ObjKey]) -> Autoscaler:
    return Autoscaler(
        Kube(TierApi()),  # type: ignore[arg-type]  # duck-typed ApiClient
        cache,
        refresh_status=refreshed.append,
        registry=BrokerRegistry(lambda url: ScriptedSource({}), max_age=0.0),
        control=control,
    )


async def _decide(autoscaler: Autoscaler) -> None:
    await autoscaler.tick()
    await asyncio.gather(*list(autoscaler.pools._scale_ins.values()))


def test_a_deleted_pool_keeps_no_census_note_or_remote_control_state() -> None:
    cache, refreshed = FleetCache(), []
    control = ScriptedWorkers("mute")

    async def main() -> Autoscaler:
        autoscaler = _autoscaler(cache, control, refreshed)
        key = _pool(cache, replicas=3)
        await _decide(autoscaler)  # remote control off: the Warning once, and the condition's input
        assert any(k[0] == key for k in autoscaler.pools.notes._noted)
        assert "worker_enable_remote_control" in cache.runtime[key].remote_control_off["high"]
        assert key in refreshed
        control.mode = "busy"
        _pool(cache, replicas=3)
        await _decide(autoscaler)  # three busy workers: held at 3, the census kept for reuse
        assert any(k[0] == key for k in autoscaler.scale_in._censuses)
        cache.drop_pool(key)
        await autoscaler.tick()
        return autoscaler

    autoscaler = asyncio.run(main())
    assert autoscaler.scale_in._censuses == {}
    assert autoscaler.pools.notes._noted == {}
    assert autoscaler.pools._steady == {} and autoscaler.pools._last_status == {}
    assert ("shop", "shop") not in cache.runtime


def test_workers_that_answer_again_clear_the_remote_control_problem() -> None:
    cache, refreshed = FleetCache(), []
    control = ScriptedWorkers("mute")

    async def main() -> ObjKey:
        autoscaler = _autoscaler(cache, control, refreshed)
        key = _pool(cache, replicas=3)
        await _decide(autoscaler)
        assert cache.runtime[key].remote_control_off
        control.mode = "busy"
        _pool(cache, replicas=3)  # the tier back at 3 (a new rollout): a scale-down asks again
        await _decide(autoscaler)
        return key

    key = asyncio.run(main())
    assert cache.runtime[key].remote_control_off == {} and cache.runtime[key].remote_control_checked
