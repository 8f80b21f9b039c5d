"""A deduplicating, rate-limited work queue, as controller-runtime has.

Keys are enqueued by watch events; a key already waiting is not queued twice, and a
key being processed is re-queued once after it finishes, so bursts of events for one
pool collapse into one reconcile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from celery_fleet.planning.backoff import Backoff

K = TypeVar("K", bound=Hashable)
RETRY_BACKOFF = Backoff(initial=0.5, maximum=30.0)  # a failed reconcile: 0.5 s, doubling, at most 30 s


class WorkQueue(Generic[K]):
    def __init__(self, *, backoff: Backoff = RETRY_BACKOFF) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._waiting: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._backoff = backoff

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._waiting:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._waiting.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        if key in self._timers or key in self._waiting:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def backoff(self, key: K) -> float:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = self._backoff.delay(n)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._waiting)

    async def run(self, worker: Callable[[K], Awaitable[None]], concurrency: int) -> None:
        async def loop() -> None:
            while True:
                key = await self._queue.get()
                self._waiting.discard(key)
                self._active.add(key)
                try:
                    await worker(key)
                finally:
                    self._active.discard(key)
                    if key in self._dirty:
                        self._dirty.discard(key)
                        self.add(key)

        await asyncio.gather(*(loop() for _ in range(concurrency)))


def monotonic() -> float:
    return time.monotonic()
