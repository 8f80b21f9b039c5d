"""The reconcile work queue: dedup, re-queue while active, backoff."""

from __future__ import annotations

import asyncio

from celery_fleet.handlers.workqueue import WorkQueue
from celery_fleet.planning.backoff import Backoff


def test_dedup_and_requeue_while_active() -> None:
    async def scenario() -> list[str]:
        q: WorkQueue[str] = WorkQueue()
        seen: list[str] = []
        release = asyncio.Event()

        async def worker(key: str) -> None:
            seen.append(key)
            if len(seen) == 1:
                q.add("a")  # an event for the key being reconciled: once more afterwards
                q.add("a")
                await release.wait()

        q.add("a")
        q.add("a")  # already waiting: not queued twice
        q.add("b")
        task = asyncio.create_task(q.run(worker, concurrency=1))
        while len(seen) < 1:
            await asyncio.sleep(0)
        release.set()
        while len(seen) < 3:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == ["a", "b", "a"]


def test_backoff_grows_and_caps() -> None:
    async def scenario() -> list[float]:
        q: WorkQueue[str] = WorkQueue(backoff=Backoff(initial=0.5, maximum=4))
        delays = []
        for _ in range(6):
            delays.append(q.backoff("k"))
            q._timers.pop("k").cancel()  # keep the loop clean; we test the schedule only
        q.forget("k")
        delays.append(q.backoff("k"))
        q._timers.pop("k").cancel()
        return delays

    assert asyncio.run(scenario()) == [0.5, 1, 2, 4, 4, 4, 0.5]
