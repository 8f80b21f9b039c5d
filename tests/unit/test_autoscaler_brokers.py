"""Each broker polls on its own schedule: a hung broker delays only the pools that use it (issue 13.7)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from celery_fleet.brokers import BrokerRegistry, DepthReading, QueueRef, UnackedSummary
from celery_fleet.brokers.source import KeyLayout, QueueDepthSource
from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import FleetCache

FAST, SLOW = "redis://fast:6379/0", "redis://slow:6379/0"


class Source:
    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.reads = 0
        self.release = asyncio.Event()

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        self.reads += 1
        if self.hang:
            await self.release.wait()
        return DepthReading(queued={r: {0: 0} for r in refs}, in_flight={}, unacked={KeyLayout(): UnackedSummary(0, 0)})

    async def aclose(self) -> None:
        self.release.set()


class Events:
    def __init__(self) -> None:
        self.posted: list[Any] = []

    def request(self, method: str, path: str, body: Any = None) -> None:
        self.posted.append(body)


def pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "celeryfleet.io/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name, "namespace": "ns", "generation": 1, "uid": name},
        "spec": {"app": "a:app", "image": "img:1", "broker": {"url": FAST}},
    }


def test_a_hung_broker_does_not_hold_up_the_others() -> None:
    sources = {FAST: Source(hang=False), SLOW: Source(hang=True)}

    def connect(url: str) -> QueueDepthSource:
        return sources[url]

    async def main() -> None:
        cache = FleetCache()
        for name, url in (("fast", FAST), ("slow", SLOW)):
            key = cache.put_pool(pool(name))
            cache.runtime[key].broker_url = url
        autoscaler = Autoscaler(
            kube=Events(),  # type: ignore[arg-type]  # no Deployments exist, so nothing is scaled
            cache=cache,
            refresh_status=lambda key: None,
            interval=0.01,
            registry=BrokerRegistry(connect, max_age=0.0),
        )
        task = asyncio.create_task(autoscaler.run())
        try:
            async with asyncio.timeout(30):
                while sources[FAST].reads < 20:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert sources[SLOW].reads == 1  # still inside its first read: the fast broker polled 20 times meanwhile

    asyncio.run(main())
