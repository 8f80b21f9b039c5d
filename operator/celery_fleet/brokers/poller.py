"""Sharing polls: pools on one broker share one connection and one round trip per poll.

:class:`BrokerRegistry` keeps one :class:`BrokerPoller` per distinct broker URL (keyed by a digest
of the URL, so the URL itself is never a dict key that could end up in a repr or a log line).
A poller reads the union of the queues of every pool that uses it; a pool asking within
``max_age`` of the last poll gets that reading, a pool asking while a poll is under way joins it.
After a failure the poller waits (exponential backoff) before touching the broker again and
answers with the last failure meanwhile, so a dead broker is not hammered by a hundred pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, QueueDepthSource, QueueRef
from celery_fleet.planning.backoff import Backoff

__all__ = ["Backoff", "BrokerPoller", "BrokerRegistry"]


@dataclass
class _Poll:
    refs: frozenset[QueueRef]
    task: asyncio.Task[DepthReading]


class BrokerPoller:
    """One broker's polls: single-flight, shared by every pool that reads from it."""

    def __init__(
        self,
        source: QueueDepthSource,
        *,
        max_age: float = 0.5,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self.source = source
        self.max_age = max_age
        self.backoff = backoff or Backoff()
        self.name = name  # safe to show (host:port/db)
        self._clock = clock
        self._interest: dict[str, frozenset[QueueRef]] = {}
        self._latest: DepthReading | None = None
        self._latest_at = 0.0
        self._failure: BrokerError | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._inflight: _Poll | None = None
        self._covered: tuple[DepthReading, frozenset[QueueRef]] | None = None
        self._queues: frozenset[QueueRef] | None = None
        self.polls = 0  # round trips attempted, for tests and metrics

    def __repr__(self) -> str:
        return f"BrokerPoller({self.name}, owners={len(self._interest)})"

    @property
    def owners(self) -> frozenset[str]:
        return frozenset(self._interest)

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def want(self, owner: str, refs: Iterable[QueueRef]) -> None:
        wanted = frozenset(refs)
        current = self._interest.get(owner)
        if current is not wanted and current != wanted:
            self._interest[owner] = wanted
            self._queues = None

    def forget(self, owner: str) -> None:
        if self._interest.pop(owner, None) is not None:
            self._queues = None

    def queues(self) -> frozenset[QueueRef]:
        """Every owner's queues; the same object while no owner's change (a poll's plan is kept by it)."""
        if self._queues is None:
            self._queues = frozenset().union(*self._interest.values())
        return self._queues

    async def read(self, owner: str, refs: Iterable[QueueRef]) -> DepthReading:
        """The depth of ``refs`` at most ``max_age`` old; raises BrokerError (possibly a cached one)."""
        wanted = frozenset(refs)  # the same object when given a frozenset
        self.want(owner, wanted)
        now = self._clock()
        latest = self._latest
        if latest is not None and now - self._latest_at <= self.max_age and self._covers(latest, wanted):
            return latest
        if self._failure is not None and now < self._retry_at:
            raise self._failure
        poll = self._inflight
        if poll is not None and not wanted <= poll.refs:
            # A poll without these queues is under way: let it land, then poll the new union.
            await asyncio.wait([poll.task])
            poll = self._inflight
        if poll is None or not wanted <= poll.refs:
            poll = self._start()
        # Shielded: a reader cancelled by Kopf must not cancel the poll other pools are waiting on.
        return await asyncio.shield(poll.task)

    def _covers(self, reading: DepthReading, wanted: frozenset[QueueRef]) -> bool:
        # Asked again and again for the same queues of the same reading: answered once.
        if self._covered is not None and self._covered[0] is reading and self._covered[1] is wanted:
            return True
        if not reading.covers(wanted):
            return False
        self._covered = (reading, wanted)
        return True

    def _start(self) -> _Poll:
        refs = self.queues()
        task = asyncio.ensure_future(self._run(refs))
        task.add_done_callback(_retrieve)
        poll = _Poll(refs, task)
        self._inflight = poll
        return poll

    async def _run(self, refs: frozenset[QueueRef]) -> DepthReading:
        started = self._clock()
        try:
            try:
                self.polls += 1
                reading = await self.source.read(refs)
            except BrokerError as err:
                if self._failures or err.kind is not ErrorKind.UNREACHABLE:
                    raise
                # The last poll worked: most likely a pooled connection the server dropped. Once more.
                self.polls += 1
                reading = await self.source.read(refs)
        except BrokerError as err:
            self._failures += 1
            self._failure = err
            # Our own slow poll says how long it needs (err.retry_after): never sooner than that.
            self._retry_at = self._clock() + max(self.backoff.delay(self._failures), err.retry_after)
            raise
        finally:
            self._inflight = None
        self._latest, self._latest_at = reading, started
        self._failure, self._failures = None, 0
        return reading

    async def aclose(self) -> None:
        poll = self._inflight
        if poll is not None:
            poll.task.cancel()
            with contextlib.suppress(BaseException):
                await poll.task
        await self.source.aclose()


def _retrieve(task: asyncio.Task[DepthReading]) -> None:
    # Mark the exception as seen: every reader gets it through the shield, or nobody was waiting.
    if not task.cancelled():
        task.exception()


Connect = Callable[..., QueueDepthSource]  # (url) or (url, options)


class BrokerRegistry:
    """One :class:`BrokerPoller` per distinct broker URL, shared by the pools (owners) that use it."""

    def __init__(
        self,
        connect: Connect,
        *,
        max_age: float = 0.5,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        display: Callable[[str], str] = lambda url: "",
    ) -> None:
        self._connect = connect
        self._display = display
        self._max_age = max_age
        self._backoff = backoff
        self._clock = clock
        self._pollers: dict[tuple[str, Hashable], BrokerPoller] = {}
        self._owner_broker: dict[str, tuple[str, Hashable]] = {}

    def __repr__(self) -> str:
        return f"BrokerRegistry(brokers={len(self._pollers)}, owners={len(self._owner_broker)})"

    def __len__(self) -> int:
        return len(self._pollers)

    async def poller_for(self, owner: str, url: str, options: Hashable = None) -> BrokerPoller:
        """The shared poller of ``url`` for ``owner`` (e.g. "namespace/pool"); raises BrokerError.

        ``options`` (e.g. the TLS settings) are part of the broker's identity and are passed to
        ``connect(url, options)`` when set. An owner whose URL or options changed (a rotated Secret)
        moves to the new broker's poller; the old one is closed when nobody else uses it.
        """
        key = (hashlib.sha256(url.encode()).hexdigest(), options)
        previous = self._owner_broker.get(owner)
        if previous is not None and previous != key:
            await self.release(owner)
        poller = self._pollers.get(key)
        if poller is None:
            poller = BrokerPoller(
                self._connect(url) if options is None else self._connect(url, options),
                max_age=self._max_age,
                backoff=self._backoff,
                clock=self._clock,
                name=self._display(url),
            )
            self._pollers[key] = poller
        self._owner_broker[owner] = key
        return poller

    async def release(self, owner: str) -> None:
        """Forget an owner (its pool was deleted); close the broker's poller if it was the last."""
        key = self._owner_broker.pop(owner, None)
        if key is None:
            return
        poller = self._pollers[key]
        poller.forget(owner)
        if key not in self._owner_broker.values():
            del self._pollers[key]
            await poller.aclose()

    async def aclose(self) -> None:
        pollers = list(self._pollers.values())
        self._pollers.clear()
        self._owner_broker.clear()
        for poller in pollers:
            await poller.aclose()
