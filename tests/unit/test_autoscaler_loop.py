"""The autoscaler loop's decisions without a cluster or a Redis: one `tick` over a hand-filled
cache, a scripted queue-depth source and the recording API fake."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from celery_fleet.brokers import BrokerRegistry
from celery_fleet.brokers.source import QueueDepthSource
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.kube.client import Kube
from tests.support.cached_pool import ScriptedSource, put_pool
from tests.support.fake_api import RecordingApi

TIER_REPLICAS = {"min": 2, "max": 8}
AUTOSCALING = {"targetDepthPerReplica": 100}


def _tick(source: ScriptedSource, replicas: int) -> tuple[RecordingApi, FleetCache, ObjKey]:
    api = RecordingApi()
    cache = FleetCache()
    key = put_pool(cache, rolled_out=replicas, replicas=TIER_REPLICAS, autoscaling=AUTOSCALING)

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


def test_an_idle_pool_refreshes_its_status_only_when_what_it_shows_changes() -> None:
    """A full decision every few seconds over unchanged queues must not enqueue a reconcile each time
    (at 1000 idle pools that was most of the operator's CPU); a changed depth still reaches the status."""
    source = ScriptedSource({"high_priority": 150})  # 2 replicas wanted: the tier is steady at 2
    cache = FleetCache()
    put_pool(cache, rolled_out=2, replicas=TIER_REPLICAS, autoscaling=AUTOSCALING)
    now = [0.0]
    refreshed: list[float] = []

    async def main() -> None:
        autoscaler = Autoscaler(
            Kube(RecordingApi()),  # type: ignore[arg-type]  # duck-typed ApiClient
            cache,
            refresh_status=lambda key: refreshed.append(now[0]),
            registry=BrokerRegistry(lambda url: source, max_age=0.0),
            clock=lambda: now[0],
        )
        for t in range(0, 61, 3):  # a minute of polls, past every periodic decision and refresh period
            now[0] = float(t)
            await autoscaler.tick()
        assert refreshed == [0.0]  # the first decision's record, then nothing new to show
        source.depth["high_priority"] = 180  # still 2 replicas, but the status shows the depth
        for t in range(63, 80, 3):
            now[0] = float(t)
            await autoscaler.tick()

    asyncio.run(main())
    assert len(refreshed) == 2 and refreshed[1] >= 63.0


def test_a_pool_created_again_under_its_name_keeps_nothing_of_the_old_one() -> None:
    """Deleted and created again between two passes (a new uid): the old pool's steady state and series
    are not the new one's."""
    source = ScriptedSource({"high_priority": 150})
    cache = FleetCache()
    key = put_pool(cache, rolled_out=2, replicas=TIER_REPLICAS, autoscaling=AUTOSCALING)

    async def main() -> None:
        autoscaler = Autoscaler(
            Kube(RecordingApi()),  # type: ignore[arg-type]  # duck-typed ApiClient
            cache,
            refresh_status=lambda key: None,
            registry=BrokerRegistry(lambda url: source, max_age=0.0),
        )
        await autoscaler.tick()
        assert key in autoscaler.pools._steady  # the old pool is steady at 2
        old = cache.pool(key)
        assert old is not None
        forgotten: list[ObjKey] = []
        autoscaler.pools.forget = forgotten.append  # type: ignore[method-assign]  # record, as the real one clears
        cache.put_pool({**old, "metadata": {**old["metadata"], "uid": "new-uid"}})
        await autoscaler.tick()
        assert forgotten == [key]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("target", "ready"), [pytest.param(10, 3, id="wait target"), pytest.param(None, None, id="depth")]
)
def test_a_wait_target_gets_the_ready_pods(monkeypatch: Any, target: int | None, ready: int | None) -> None:
    """The loop feeds a tier with targetWaitSeconds the Deployment's readyReplicas (its estimators
    measure start-ups from it; the decision itself is planning's, tested there); other tiers go as before."""
    import celery_fleet.handlers.autoscaler.pool as pool_module
    from celery_fleet.planning.scaling import Observation

    seen: list[Observation] = []
    real = pool_module.decide

    def spy(tiers: Any, observations: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend(o for o in observations.values() if isinstance(o, Observation))
        return real(tiers, observations, *args, **kwargs)

    monkeypatch.setattr(pool_module, "decide", spy)
    if target is not None:
        monkeypatch.setitem(AUTOSCALING, "targetWaitSeconds", target)
    _tick(ScriptedSource({"high_priority": 5}), replicas=3)
    assert seen and seen[0].ready_replicas == ready
