"""Shared polls: single flight, freshness, the union of pools' queues, backoff, the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from celery_fleet.brokers import (
    Backoff,
    BrokerError,
    BrokerPoller,
    BrokerRegistry,
    DepthReading,
    ErrorKind,
    QueueDepthSource,
    QueueRef,
    UnackedSummary,
)

A, B, C = QueueRef("a"), QueueRef("b"), QueueRef("c")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A fake broker: every queue holds `depth`; `gate` (when set) holds reads until released."""

    def __init__(self) -> None:
        self.reads: list[frozenset[QueueRef]] = []
        self.failures: list[BrokerError] = []
        self.gate: asyncio.Event | None = None
        self.closed = False
        self.depth = 1

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        self.reads.append(frozenset(refs))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        return DepthReading(queued={r: {0: self.depth} for r in refs}, in_flight={}, unacked={"": UnackedSummary(0, 0)})

    async def aclose(self) -> None:
        self.closed = True


DOWN = BrokerError(ErrorKind.UNREACHABLE, "cannot reach r:6379/0")
SLOW = BrokerError(ErrorKind.TIMEOUT, "no answer in time from r:6379/0")


def poller(source: Source, clock: Clock, max_age: float = 0.5) -> BrokerPoller:
    return BrokerPoller(source, clock=clock, backoff=Backoff(initial=1, factor=2, maximum=4), max_age=max_age)


def test_concurrent_readers_share_one_round_trip() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)

    async def main() -> list[DepthReading]:
        source.gate = asyncio.Event()
        p.want("pool-2", [B])
        readers = [asyncio.ensure_future(p.read(f"pool-{i}", [A, B][i % 2 : i % 2 + 1])) for i in range(10)]
        await asyncio.sleep(0)  # let every reader reach the poll (no time passes)
        source.gate.set()
        return await asyncio.gather(*readers)

    readings = asyncio.run(main())
    assert source.reads == [frozenset({A, B})]
    assert all(r is readings[0] for r in readings)


def test_fresh_reading_is_reused_then_refreshed() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock, max_age=0.5)

    async def main() -> None:
        await p.read("x", [A])
        clock.now += 0.4
        await p.read("y", [A])
        assert len(source.reads) == 1
        clock.now += 0.2
        await p.read("y", [A])
        assert len(source.reads) == 2

    asyncio.run(main())


def test_a_new_queue_triggers_a_poll_of_the_union() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)

    async def main() -> None:
        await p.read("x", [A])
        await p.read("y", [C])  # fresh, but C was not in it
        assert source.reads == [frozenset({A}), frozenset({A, C})]
        p.forget("x")
        clock.now += 1
        await p.read("y", [C])
        assert source.reads[-1] == frozenset({C})

    asyncio.run(main())


def test_reader_joining_a_poll_without_its_queue_gets_a_second_poll() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)

    async def main() -> None:
        source.gate = asyncio.Event()
        first = asyncio.ensure_future(p.read("x", [A]))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(p.read("y", [B]))
        await asyncio.sleep(0)
        source.gate.set()
        ra, rb = await asyncio.gather(first, second)
        assert ra.covers([A]) and rb.covers([B])

    asyncio.run(main())
    assert source.reads == [frozenset({A}), frozenset({A, B})]


def test_failures_back_off_and_answer_from_cache() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)
    source.failures = [SLOW, SLOW, SLOW]

    async def attempt() -> ErrorKind | None:
        try:
            await p.read("x", [A])
        except BrokerError as err:
            return err.kind
        return None

    async def main() -> None:
        assert await attempt() is ErrorKind.TIMEOUT  # poll 1
        clock.now += 0.9
        assert await attempt() is ErrorKind.TIMEOUT  # cached: 1 s backoff not over
        assert len(source.reads) == 1
        clock.now += 0.1
        assert await attempt() is ErrorKind.TIMEOUT  # poll 2, then 2 s backoff
        clock.now += 1.9
        assert await attempt() is ErrorKind.TIMEOUT
        assert len(source.reads) == 2
        clock.now += 0.1
        assert await attempt() is ErrorKind.TIMEOUT  # poll 3, then 4 s
        assert p.consecutive_failures == 3
        clock.now += 4
        assert await attempt() is None  # recovered
        assert p.consecutive_failures == 0

    asyncio.run(main())
    assert len(source.reads) == 4


def test_dropped_connection_after_a_good_poll_is_retried_once() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)

    async def main() -> None:
        await p.read("x", [A])
        clock.now += 1
        source.failures = [DOWN]
        await p.read("x", [A])  # the retry succeeds
        assert len(source.reads) == 3
        clock.now += 1
        source.failures = [DOWN, DOWN]
        with pytest.raises(BrokerError):
            await p.read("x", [A])
        assert len(source.reads) == 5

    asyncio.run(main())


def test_a_cancelled_reader_does_not_cancel_the_shared_poll() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)

    async def main() -> DepthReading:
        source.gate = asyncio.Event()
        impatient = asyncio.ensure_future(p.read("x", [A]))
        patient = asyncio.ensure_future(p.read("y", [A]))
        await asyncio.sleep(0)
        impatient.cancel()
        await asyncio.sleep(0)
        source.gate.set()
        return await patient

    assert asyncio.run(main()).covers([A])
    assert len(source.reads) == 1


def test_registry_shares_pollers_per_url_and_closes_unused_ones() -> None:
    made: list[Source] = []

    def connect(url: str) -> QueueDepthSource:
        made.append(Source())
        return made[-1]

    registry = BrokerRegistry(connect, display=lambda url: url.split("@")[-1])

    async def main() -> None:
        p1 = await registry.poller_for("ns/a", "redis://:pw@r1:6379/0")
        p2 = await registry.poller_for("ns/b", "redis://:pw@r1:6379/0")
        p3 = await registry.poller_for("ns/c", "redis://:pw@r2:6379/0")
        assert p1 is p2 and p1 is not p3 and len(registry) == 2
        assert "pw" not in repr(p1) and "pw" not in repr(registry)
        # A rotated Secret moves ns/c to a new broker; its old poller is closed.
        p4 = await registry.poller_for("ns/c", "redis://:pw2@r2:6379/0")
        assert p4 is not p3 and made[1].closed
        await registry.release("ns/a")
        assert not made[0].closed
        await registry.release("ns/b")
        assert made[0].closed and len(registry) == 1
        await registry.aclose()
        assert made[2].closed and len(registry) == 0

    asyncio.run(main())


def test_our_own_slow_poll_is_not_retried_before_its_budget_allows() -> None:
    source, clock = Source(), Clock()
    p = poller(source, clock)  # backoff 1 s after a first failure
    source.failures = [BrokerError(ErrorKind.OWN_POLL_SLOW, "our script overran", retry_after=3.0)]

    async def main() -> None:
        with pytest.raises(BrokerError) as err:
            await p.read("x", [A])
        assert err.value.kind is ErrorKind.OWN_POLL_SLOW  # never reported as an unreachable broker
        clock.now += 2.9
        with pytest.raises(BrokerError):
            await p.read("x", [A])  # answered from the cached failure: no new poll
        assert len(source.reads) == 1
        clock.now += 0.1
        await p.read("x", [A])
        assert len(source.reads) == 2

    asyncio.run(main())
