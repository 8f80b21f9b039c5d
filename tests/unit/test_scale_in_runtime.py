"""Scale-in's state in a long-running operator, over the recording API fake and a scripted broker
and worker control: what one census keeps (censuses, notes, the RemoteControl condition's input,
the worker gauges) and that a deleted pool leaves none of it behind."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubernetes.client.rest import ApiException

from celery_fleet import metrics
from celery_fleet.brokers import BrokerRegistry
from celery_fleet.brokers.control import ControlError, ControlTarget
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


# -- the protocol's act path: the order of its writes, resume, unknown, scale-ups never held


class PodsApi(RecordingApi):
    """A tier of pods that keeps what merge patches write (annotations, labels) and answers label
    selectors; scale writes are logged in `log` with the pods' patches, in order."""

    def __init__(self, pods: Sequence[str], log: list[tuple[str, ...]]) -> None:
        super().__init__()
        self.log = log
        owner = {"kind": "ReplicaSet", "name": "shop-high-rs", "uid": "rs-uid", "controller": True}
        self.pods: dict[str, dict[str, Any]] = {
            p: {"metadata": {"namespace": "shop", "name": p, "uid": f"uid-{p}", "ownerReferences": [owner],
                             "labels": {"celeryfleet.io/pool": "shop", "celeryfleet.io/tier": "high"},
                             "annotations": {}},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
            for p in pods
        }  # fmt: skip

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        super().call_api(path, method, **kwargs)
        body = kwargs.get("body") or {}
        if method == "PATCH" and path.endswith("/scale"):
            self.log.append(("scale", str(body["spec"]["replicas"])))
        elif method == "PATCH" and "/pods/" in path:
            pod = self.pods[path.rsplit("/", 1)[1]]
            for part in ("annotations", "labels"):
                for k, v in (body.get("metadata") or {}).get(part, {}).items():
                    if v is None:
                        pod["metadata"][part].pop(k, None)
                    else:
                        pod["metadata"][part][k] = v
            notes = (body.get("metadata") or {}).get("annotations", {})
            mark = notes.get("celeryfleet.io/scale-in", "")
            state = "unmark" if "celeryfleet.io/scale-in" in notes and mark is None else (
                json.loads(mark)["state"] if mark else "cost")  # fmt: skip
            self.log.append((state, pod["metadata"]["name"]))
        if method == "GET" and path.endswith("/replicasets"):
            owner = {"kind": "Deployment", "name": "shop-high", "uid": "dep-uid", "controller": True}
            return {"items": [{"metadata": {"namespace": "shop", "name": "shop-high-rs", "uid": "rs-uid",
                                            "ownerReferences": [owner]}}]}, 200, {}  # fmt: skip
        if method == "GET" and path.endswith("/pods"):
            selector = dict(kwargs.get("query_params") or []).get("labelSelector", "")
            wanted = [s.split("=") for s in selector.split(",") if s]
            items = [p for p in self.pods.values() if all(_matches(p["metadata"]["labels"], w) for w in wanted)]
            return {"items": json.loads(json.dumps(items))}, 200, {}
        return {}, 200, {}


def _matches(labels: dict[str, str], wanted: list[str]) -> bool:
    return labels.get(wanted[0]) == wanted[1] if len(wanted) == 2 else wanted[0] in labels


class ProtocolWorkers:
    """Workers that answer with `reports` (pod -> WorkerReport); `after_drain` replaces a report once
    its pod was drained; `fail`: the control path raises; every call lands in `log`."""

    def __init__(self, log: list[tuple[str, ...]], reports: dict[str, WorkerReport]) -> None:
        self.broadcasts = 0
        self.log = log
        self.reports = reports
        self.after_drain: dict[str, WorkerReport] = {}
        self.drained: set[str] = set()
        self.fail = False
        self.slow: asyncio.Event | None = None
        self.deadlines: list[float | None] = []

    async def census(self, target: ControlTarget, pods: Sequence[str], *, deadline: float | None = None
                     ) -> dict[str, WorkerReport]:  # fmt: skip
        self.deadlines.append(deadline)
        self.log.append(("census", *sorted(pods)))
        if self.slow is not None:
            await self.slow.wait()
        if self.fail:
            raise ControlError("remote control failed (ConnectionError)")
        return {p: self.after_drain.get(p, self.reports[p]) if p in self.drained else self.reports[p] for p in pods}

    async def cancel_consumer(self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *,
                              deadline: float | None = None) -> set[str]:  # fmt: skip
        self.log.append(("cancel_consumer", *sorted(pods)))
        self.drained |= set(pods)
        return set(pods)

    async def add_consumer(self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *,
                           deadline: float | None = None) -> set[str]:  # fmt: skip
        self.log.append(("add_consumer", *sorted(pods)))
        self.drained -= set(pods)
        return set(pods)


def _protocol(reports: dict[str, WorkerReport], replicas: int = 3, **autoscaling: Any
              ) -> tuple[FleetCache, PodsApi, ProtocolWorkers, list[tuple[str, ...]], list[ObjKey]]:  # fmt: skip
    log: list[tuple[str, ...]] = []
    cache, refreshed = FleetCache(), []
    api = PodsApi(sorted(reports), log)
    control = ProtocolWorkers(log, reports)
    put_pool(cache, rolled_out=replicas, replicas={"min": 0, "max": 8}, autoscaling={**IMMEDIATE, **autoscaling})
    return cache, api, control, log, refreshed


def test_every_step_is_written_on_the_pod_before_it_is_taken() -> None:
    pods = {"a": WorkerReport("a"), "b": WorkerReport("b"), "c": WorkerReport("c", active=1)}
    cache, api, control, log, refreshed = _protocol(pods)
    # The task sent between the census and the drain: b started it, it is seen by the census after the drain.
    control.after_drain["b"] = WorkerReport("b", active=1)

    async def main() -> None:
        await _decide(_autoscaler(cache, control, refreshed, api))  # type: ignore[arg-type]

    asyncio.run(main())
    steps = [e for e in log if e[0] != "cost"]
    assert steps == [
        ("census", "a", "b", "c"),
        ("draining", "a"),
        ("draining", "b"),  # marked before the drain
        ("cancel_consumer", "a", "b"),
        ("census", "a", "b"),  # the drained candidates, asked after the drain
        ("drained", "a"),  # with its cost -1000, before the scale
        ("scale", "2"),  # past the idle one only: b took a task and stays drained, with its pod
    ], log
    assert api.pods["a"]["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == "-1000"
    assert json.loads(api.pods["b"]["metadata"]["annotations"]["celeryfleet.io/scale-in"])["state"] == "draining"
    assert api.pods["b"]["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] != "-1000"
    assert all(d is not None for d in control.deadlines)  # every census has its absolute deadline


def test_a_busy_drained_candidate_gets_its_queues_back_when_demand_returns() -> None:
    pods = {"a": WorkerReport("a"), "b": WorkerReport("b", active=1)}
    cache, api, control, log, refreshed = _protocol(pods, replicas=2)
    control.after_drain["a"] = WorkerReport("a", active=1)
    source = ScriptedSource({})

    async def main() -> None:
        autoscaler = _autoscaler(cache, control, refreshed, api)  # type: ignore[arg-type]
        autoscaler.registry = BrokerRegistry(lambda url: source, max_age=0.0)
        await _decide(autoscaler)  # a is chosen, drained, found busy: kept drained, nobody goes
        assert "a" in autoscaler.scale_in.owned(("shop", "shop"), "high")
        log.clear()
        source.depth = {"high_priority": 500}  # demand returns
        await _decide(autoscaler)
        assert not autoscaler.scale_in.owned(("shop", "shop"), "high")

    asyncio.run(main())
    assert ("add_consumer", "a") in log and ("unmark", "a") in log
    assert log.index(("add_consumer", "a")) < log.index(("unmark", "a"))  # queues back before the mark goes
    assert "celeryfleet.io/scale-in" not in api.pods["a"]["metadata"]["annotations"]


def test_a_new_process_undoes_marks_it_does_not_own_and_leaves_pods_on_their_way_out() -> None:
    pods = {"a": WorkerReport("a", active=1), "b": WorkerReport("b", active=1), "c": WorkerReport("c", active=1)}
    cache, api, control, log, refreshed = _protocol(pods, replicas=2)
    from celery_fleet.planning.scale_in import Mark, Phase, write_mark

    # A dead predecessor drained a (draining: its census never came back) and b (drained, cost -1000, and
    # spec.replicas already lowered to 2: on its way out).
    for name, state, cost in (("a", Phase.DRAINING, None), ("b", Phase.DRAINED, "-1000")):
        patch = write_mark(Mark(state, 1.0, ("high_priority",), f"uid-{name}"))["metadata"]
        api.pods[name]["metadata"]["annotations"].update(patch["annotations"])
        api.pods[name]["metadata"]["labels"].update(patch["labels"])
        if cost:
            api.pods[name]["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] = cost

    async def main() -> None:
        await _decide(_autoscaler(cache, control, refreshed, api))  # type: ignore[arg-type]

    asyncio.run(main())
    assert ("add_consumer", "a") in log and ("unmark", "a") in log
    assert not any(e[0] == "add_consumer" and "b" in e for e in log)  # b holds nothing and goes
    assert "celeryfleet.io/scale-in" in api.pods["b"]["metadata"]["annotations"]


def test_a_failed_control_path_holds_the_scale_in_with_a_condition() -> None:
    pods = {"a": WorkerReport("a"), "b": WorkerReport("b")}
    cache, api, control, log, refreshed = _protocol(pods, replicas=2)
    control.fail = True

    async def main() -> None:
        await _decide(_autoscaler(cache, control, refreshed, api))  # type: ignore[arg-type]

    asyncio.run(main())
    runtime = cache.runtime[("shop", "shop")]
    assert not any(e[0] in ("scale", "draining") for e in log)  # unknown is never idle
    assert "cannot be asked" in runtime.scale_in_held["high"] and "ConnectionError" in runtime.scale_in_held["high"]
    from celery_fleet.planning.conditions import scale_in_condition

    condition = scale_in_condition(runtime.scale_in_held, runtime.remote_control_checked)
    assert condition is not None and (condition.status, condition.reason) == ("False", "WorkersUnknown")
    control.fail = False

    async def again() -> None:
        autoscaler = _autoscaler(cache, control, refreshed, api)  # type: ignore[arg-type]
        await _decide(autoscaler)

    asyncio.run(again())
    assert runtime.scale_in_held == {} and ("scale", "0") in log


def test_scale_ups_never_wait_for_a_census() -> None:
    """While tier high's census hangs (a silent broker), a burst on another tier scales it at once."""
    pods = {"a": WorkerReport("a")}
    cache, api, control, log, refreshed = _protocol(pods, replicas=1)
    body = cache.pools[("shop", "shop")]
    low = {"name": "low", "queues": ["low_q"], "concurrency": 1, "replicas": {"min": 1, "max": 8},
           "autoscaling": {**IMMEDIATE, "targetDepthPerReplica": 10}}  # fmt: skip
    cache.put_pool({**body, "spec": {**body["spec"], "tiers": [*body["spec"]["tiers"], low]}})
    from tests.support.cached_pool import POOL_LABEL, UID

    owner = {"kind": "CeleryWorkerPool", "name": "shop", "uid": UID, "controller": True}
    cache.put_child(POOL_LABEL, {"kind": "Deployment", "spec": {"replicas": 1}, "status": {"replicas": 1},
                                 "metadata": {"name": "shop-low", "namespace": "shop", "uid": "low-uid",
                                              "ownerReferences": [owner], "labels": {POOL_LABEL: "shop"}}})  # fmt: skip
    source = ScriptedSource({})

    async def main() -> None:
        control.slow = asyncio.Event()
        autoscaler = _autoscaler(cache, control, refreshed, api)  # type: ignore[arg-type]
        autoscaler.registry = BrokerRegistry(lambda url: source, max_age=0.0)
        await autoscaler.tick()  # high: 1 -> 0 wanted: its census starts and hangs
        await asyncio.sleep(0)
        assert autoscaler.pools._asking.get(("shop", "shop")) == frozenset({"high"})
        source.depth = {"low_q": 50}
        await autoscaler.tick()
        for task in list(autoscaler.pools._resumes.values()):
            await task
        await asyncio.sleep(0.05)
        assert ("scale", "5") in log, log  # low scaled while high's census still hangs
        control.slow.set()
        await asyncio.gather(*list(autoscaler.pools._scale_ins.values()))

    asyncio.run(main())


def test_a_notready_pod_that_runs_is_asked_and_a_booting_one_holds_nothing() -> None:
    from celery_fleet.handlers.autoscaler.scale_in import _report, pod_running

    running = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}}
    pending = {"status": {"phase": "Pending"}}
    assert pod_running(running) and not pod_running(pending)
    silent = {"p": WorkerReport("p", answered=False)}  # its mailbox exists: a worker that was connected
    assert _report("p", running, silent).busy
    booting = {"p": WorkerReport("p", answered=False, remote_control=False)}  # no mailbox yet
    assert not _report("p", running, booting).busy and not _report("p", running, booting).ready
    assert not _report("p", pending, {}).ready  # not asked: holds nothing


def test_with_desired_records_the_scale_that_was_written() -> None:
    from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier
    from celery_fleet.planning.scaling import Observation, decide, with_desired

    tier = Tier(name="w", queues=["w"], concurrency=1, replicas=ReplicaBounds(min=0, max=4),
                autoscaling=Autoscaling(scale_down_stabilization_seconds=0, cooldown_seconds=0))  # fmt: skip
    (d,) = decide([tier], {"w": Observation(0, 0)}, {"w": 4}, {}, now=10.0)
    assert d.desired == 0
    fewer = with_desired(d, 3, "drained p took work during the census: kept drained until idle")
    assert fewer.desired == 3 and fewer.message.startswith("Scaled tier w 4 -> 3: ")
    assert fewer.message.endswith("kept drained until idle")
    assert [(e.from_replicas, e.to_replicas) for e in fewer.history.scale_events] == [(4, 3)]
    held = with_desired(d, 4, "the drain failed")
    assert held.message.startswith("Tier w holds 4") and held.history.scale_events == ()
