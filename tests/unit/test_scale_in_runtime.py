"""Scale-in's state in a long-running operator, over the recording API fake and a scripted broker
and worker control: what one census keeps (censuses, notes, the RemoteControl condition's input,
the worker gauges) and that a deleted pool leaves none of it behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubernetes.client.rest import ApiException

from celery_fleet import metrics
from celery_fleet.brokers import BrokerRegistry
from celery_fleet.brokers.control import ControlTarget
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.kube.client import Kube
from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scale_in import WorkerReport
from tests.support.cached_pool import ScriptedSource, put_pool
from tests.support.fake_api import RecordingApi

PODS = ("shop-high-rs-a", "shop-high-rs-b", "shop-high-rs-c")
IMMEDIATE = {"targetDepthPerReplica": 100, "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}


class TierApi(RecordingApi):
    """Answers the scale-in's LISTs: the tier's ReplicaSet (ours by uid) and its three Ready pods;
    refuses scale writes while `refuse_scale`."""

    refuse_scale = False

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        super().call_api(path, method, **kwargs)
        if method == "PATCH" and path.endswith("/scale") and self.refuse_scale:
            raise ApiException(status=500, reason="Internal Server Error")
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
    """The tier's workers: `mute` (remote control off: no answer, no mailbox), idle, or busy; those
    that answer each hold `scheduled` ETA tasks."""

    def __init__(self, mode: str = "mute") -> None:
        self.broadcasts = 0
        self.mode = mode
        self.scheduled = 0

    async def census(
        self, target: ControlTarget, pods: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, WorkerReport]:
        if self.mode == "mute":
            return {p: WorkerReport(p, answered=False, remote_control=False) for p in pods}
        return {p: WorkerReport(p, active=1 if self.mode == "busy" else 0, scheduled=self.scheduled) for p in pods}

    async def cancel_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        return set()

    async def add_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        return set()


def _pool(cache: FleetCache, replicas: int) -> ObjKey:
    """Tier high at `replicas`, scaled down as soon as it is idle (no stabilization, no cooldown)."""
    return put_pool(cache, rolled_out=replicas, replicas={"min": 0, "max": 8}, autoscaling=IMMEDIATE)


def _autoscaler(
    cache: FleetCache, control: ScriptedWorkers, refreshed: list[ObjKey], api: TierApi | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Autoscaler:  # fmt: skip
    return Autoscaler(
        Kube(api or TierApi()),  # type: ignore[arg-type]  # duck-typed ApiClient
        cache,
        refresh_status=refreshed.append,
        registry=BrokerRegistry(lambda url: ScriptedSource({}), max_age=0.0),
        control=control,
        clock=clock,
    )


async def _decide(autoscaler: Autoscaler) -> None:
    await autoscaler.tick()
    await asyncio.gather(*list(autoscaler.pools._scale_ins.values()), *list(autoscaler.pools._resumes.values()))


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


def _worker_gauges() -> tuple[float | None, float | None]:
    labels = {"namespace": "shop", "pool": "shop", "tier": "high"}
    return (
        metrics.REGISTRY.get_sample_value("celery_fleet_tier_busy_workers", labels),
        metrics.REGISTRY.get_sample_value("celery_fleet_tier_scheduled_tasks", labels),
    )


def test_the_worker_gauges_are_the_status_record_even_when_a_census_goes_unused() -> None:
    """The busy-workers and scheduled-tasks gauges say what the status says: a census whose scale-in
    could not be written (the scale refused) changes neither."""
    metrics.forget_pool("shop", "shop")  # the registry is process-wide
    cache, refreshed, api = FleetCache(), [], TierApi()
    control = ScriptedWorkers("busy")
    control.scheduled = 2
    now = [1000.0]

    async def main() -> list[tuple[TierScaling, tuple[float | None, float | None]]]:
        seen = []
        autoscaler = _autoscaler(cache, control, refreshed, api, clock=lambda: now[0])
        key = _pool(cache, replicas=3)
        await _decide(autoscaler)  # three busy workers holding 2 ETA tasks each: held at 3
        seen.append((cache.runtime[key].scaling["high"], _worker_gauges()))
        control.mode, control.scheduled, api.refuse_scale = "idle", 0, True
        now[0] += 60  # past the census reuse
        await _decide(autoscaler)  # all idle, scale-in to 0 decided, but the scale is refused
        seen.append((cache.runtime[key].scaling["high"], _worker_gauges()))
        api.refuse_scale = False
        now[0] += 60
        await _decide(autoscaler)  # asked again: idle, and the scale-in is written
        seen.append((cache.runtime[key].scaling["high"], _worker_gauges()))
        return seen

    (held, held_gauges), (refused, refused_gauges), (scaled, scaled_gauges) = asyncio.run(main())
    assert (held.busy_workers, held.scheduled) == held_gauges == (3, 6)
    assert (refused.busy_workers, refused.scheduled) == refused_gauges == (3, 6)  # the record kept, and the gauges
    assert (scaled.busy_workers, scaled.scheduled, scaled.desired_replicas) == (0, 0, 0)
    assert scaled_gauges == (0, 0)
