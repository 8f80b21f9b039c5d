"""A wait target's inputs from a real Redis: each in-flight entry's age, from the poll's one EVAL."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from celery_fleet.brokers import queue_refs
from celery_fleet.brokers.redis.connection import connect
from celery_fleet.brokers.source import DepthReading, KeyLayout
from tests.integration.test_redis_depth import QUEUE, read, seen
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def test_in_flight_ages_follow_kombu_deliveries_and_acks(
    redis_db: redis.Redis[bytes], redis_server: RedisServer
) -> None:
    """kombu's own channel delivers three messages (unacked hash + unacked_index): the poll returns each
    delivery tag with its age by the Redis clock; an acked one is gone from the next poll."""
    from kombu import Connection

    refs = queue_refs([QUEUE])
    other = queue_refs(["elsewhere"])
    with Connection(redis_server.url) as conn:
        queue = conn.SimpleQueue(QUEUE)
        for n in range(3):
            queue.put({"n": n})
        before = time.time()
        held = [queue.get(timeout=5) for _ in range(3)]
        first = seen(read(redis_server.url, refs), refs)
        assert first.in_flight == 3
        assert first.in_flight_ages is not None
        assert set(first.in_flight_ages) == {m.delivery_tag for m in held}
        assert all(0 <= age <= time.time() - before + 0.5 for age in first.in_flight_ages.values())
        # The other queue's tier holds none of them.
        assert seen(read(redis_server.url, other), other).in_flight_ages == {}

        held[0].ack()
        later = wait_for(
            lambda: (o := seen(read(redis_server.url, refs), refs)).in_flight == 2 and o,
            timeout=10,
            message="the acked delivery leaves unacked_index",
        )
        assert later.in_flight_ages is not None
        assert set(later.in_flight_ages) == {m.delivery_tag for m in held[1:]}
        for tag, age in later.in_flight_ages.items():
            assert age >= first.in_flight_ages[tag]  # older by the time between the polls
        for m in held[1:]:
            m.ack()
        queue.close()


def test_no_ages_when_the_walk_does_not_cover_the_whole_index(
    redis_db: redis.Redis[bytes], redis_server: RedisServer
) -> None:
    """A scan limit below the index size leaves the walk to resume next poll: the ages are unknown
    (None), never a partial set that would read as completions."""
    from kombu import Connection

    refs = queue_refs([QUEUE])
    with Connection(redis_server.url) as conn:
        queue = conn.SimpleQueue(QUEUE)
        for n in range(4):
            queue.put({"n": n})
        held = [queue.get(timeout=5) for _ in range(4)]

        async def main() -> DepthReading:
            source = connect(redis_server.url, scan_limit=2)
            try:
                return await source.read(refs)
            finally:
                await source.aclose()

        reading = asyncio.run(main())
        assert KeyLayout() not in reading.in_flight_ages
        observation = seen(reading, refs)
        assert observation.in_flight == 4  # extrapolated from the part walked
        assert observation.in_flight_ages is None
        for m in held:
            m.ack()
        queue.close()
