"""Issue 23 item 9: messages waiting in Celery's default queue `celery` where no tier consumes it.

The refs the poll adds (queue_refs level), the pure condition, and the autoscaler loop's Event on a
scripted broker: two pools on one broker, one of them consuming `celery`, so neither is warned.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from celery_fleet.brokers import BrokerRegistry
from celery_fleet.brokers.source import KeyLayout, queue_refs, unconsumed_refs
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import FleetCache, ObjKey
from celery_fleet.kube.client import Kube
from celery_fleet.planning.pool_status import queues_consumed
from tests.support.cached_pool import ScriptedSource, put_pool
from tests.support.fake_api import RecordingApi

LAYOUT = KeyLayout("app1:", ":")


def test_the_default_queue_is_read_under_the_tiers_layout_when_no_tier_consumes_it() -> None:
    tiers = {"high": queue_refs(["a"], priority_steps=[0, 5], layout=LAYOUT), "low": queue_refs(["b"], layout=LAYOUT)}
    (ref,) = unconsumed_refs(tiers)
    assert (ref.name, ref.layout, ref.priority_steps) == ("celery", LAYOUT, (0, 5))


@pytest.mark.parametrize(
    "tiers",
    [
        pytest.param({"high": queue_refs(["a", "celery"])}, id="a-tier-consumes-it"),
        pytest.param({}, id="no-tiers"),
    ],
)
def test_nothing_more_is_read_when_a_tier_consumes_it(tiers: dict[str, Any]) -> None:
    assert unconsumed_refs(tiers) == []


@pytest.mark.parametrize(
    ("waiting", "status", "reason"),
    [
        pytest.param({"celery": 3}, "False", "UnconsumedQueue", id="messages-wait"),
        pytest.param({"celery": 0}, "True", "NothingWaiting", id="empty"),
        pytest.param({}, "True", "DefaultQueueConsumed", id="consumed"),
    ],
)
def test_queues_consumed_condition(waiting: dict[str, int], status: str, reason: str) -> None:
    update = queues_consumed(waiting, list(waiting))
    assert (update.type, update.status, update.reason) == ("QueuesConsumed", status, reason)


def test_the_message_names_the_queue_its_depth_and_the_fix() -> None:
    message = queues_consumed({"celery": 3}, ["celery"]).message
    assert "celery (3 messages)" in message and "spec.tiers[].queues" in message


def _second_pool(cache: FleetCache, queues: list[str]) -> ObjKey:
    """Pool `other` on the same broker as shop, one tier consuming `queues`."""
    body = copy.deepcopy(cache.pools[("shop", "shop")])
    body["metadata"] = {**body["metadata"], "name": "other", "uid": "other-uid"}
    body["spec"]["tiers"] = [{"name": "main", "queues": queues, "concurrency": 1, "replicas": {"min": 0, "max": 2}}]
    key = cache.put_pool(body)
    cache.runtime[key].broker_url = cache.runtime[("shop", "shop")].broker_url
    return key


def _events(api: RecordingApi) -> list[tuple[str, str, str]]:
    return [(b["involvedObject"]["name"], b["type"], b["reason"]) for (m, path, b) in api.writes
            if m == "POST" and path.endswith("/events")]  # fmt: skip


def _run(source: ScriptedSource, cache: FleetCache, api: RecordingApi, depths: list[int]) -> list[ObjKey]:
    refreshed: list[ObjKey] = []

    async def main() -> None:
        autoscaler = Autoscaler(
            Kube(api),  # type: ignore[arg-type]  # duck-typed ApiClient
            cache,
            refresh_status=refreshed.append,
            registry=BrokerRegistry(lambda url: source, max_age=0.0),
        )
        for depth in depths:
            source.depth["celery"] = depth
            await autoscaler.tick()

    asyncio.run(main())
    return refreshed


def test_waiting_messages_raise_one_event_and_its_end_another() -> None:
    api, cache = RecordingApi(), FleetCache()
    key = put_pool(cache, rolled_out=2, replicas={"min": 2, "max": 8}, autoscaling={})
    refreshed = _run(ScriptedSource({"high_priority": 0}), cache, api, [0, 2, 5, 0])
    assert _events(api) == [("shop", "Warning", "UnconsumedQueue"), ("shop", "Normal", "NothingWaiting")]
    assert cache.runtime[key].unconsumed == {"celery": 0}
    assert refreshed.count(key) >= 3  # each change of the depth shown: 2, 5, 0


def test_a_queue_another_pool_on_the_broker_consumes_is_not_unconsumed() -> None:
    api, cache = RecordingApi(), FleetCache()
    key = put_pool(cache, rolled_out=2, replicas={"min": 2, "max": 8}, autoscaling={})
    other = _second_pool(cache, ["celery"])
    _run(ScriptedSource({"high_priority": 0}), cache, api, [4])
    assert [e for e in _events(api) if e[2] == "UnconsumedQueue"] == []
    assert cache.runtime[key].unconsumed == {} and cache.runtime[other].unconsumed == {}


def test_the_pool_status_carries_the_condition() -> None:
    from celery_fleet.handlers.pool_reconciler import PoolReconciler

    api, cache = RecordingApi(), FleetCache()
    key = put_pool(cache, rolled_out=2, replicas={"min": 2, "max": 8}, autoscaling={})
    cache.runtime[key].unconsumed = {"celery": 7}
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    (condition,) = [c for c in api.statuses()[-1]["conditions"] if c["type"] == "QueuesConsumed"]
    assert (condition["status"], condition["reason"]) == ("False", "UnconsumedQueue")
    assert "celery (7 messages)" in condition["message"]
