"""Queue-depth readers, one module per broker kind, behind :class:`QueueDepthSource`.

Typical use from a handler (all async; the Redis client is ``redis.asyncio``)::

    registry = redis_registry()                       # once, at operator startup
    poller = await registry.poller_for("ns/pool", url)  # url resolved from spec.broker
    refs = {t.name: queue_refs(t.queues, broker.global_keyprefix, broker.priority_steps) for t in tiers}
    try:
        result = await poller.read("ns/pool", [r for rs in refs.values() for r in rs])
    except BrokerError as err:                         # str(err) is safe to publish
        result = err
    observations = observe_tiers(result, refs)         # -> planning.scaling.decide(...)
    ...
    await registry.release("ns/pool")                  # when the pool is deleted
"""

from __future__ import annotations

from typing import Any

from celery_fleet.brokers.poller import Backoff, BrokerPoller, BrokerRegistry
from celery_fleet.brokers.source import (
    DEFAULT_PRIORITY_STEPS,
    BrokerError,
    DepthReading,
    ErrorKind,
    QueueDepthSource,
    QueueRef,
    UnackedSummary,
    observe_tiers,
    queue_refs,
)

__all__ = [
    "DEFAULT_PRIORITY_STEPS",
    "Backoff",
    "BrokerError",
    "BrokerPoller",
    "BrokerRegistry",
    "DepthReading",
    "ErrorKind",
    "QueueDepthSource",
    "QueueRef",
    "UnackedSummary",
    "observe_tiers",
    "queue_refs",
    "redis_registry",
]


def redis_registry(
    *,
    max_age: float = 0.5,
    backoff: Backoff | None = None,
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
    scan_limit: int | None = None,
    inflight_budget: float = 0.02,
    **kwargs: Any,
) -> BrokerRegistry:
    """A registry whose pollers read Redis brokers (``redis://`` / ``rediss://`` URLs)."""
    from celery_fleet.brokers.redis import connection, scripts, target

    limit = scripts.DEFAULT_SCAN_LIMIT if scan_limit is None else scan_limit

    def connect(url: str, options: connection.ConnectOptions | None = None) -> QueueDepthSource:
        options = options or connection.ConnectOptions()
        return connection.connect(
            url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            scan_limit=limit,
            tls=options.tls,
            master_name=options.master_name,
        )

    def display(url: str) -> str:
        return target.RedisTarget.parse(url).display

    return BrokerRegistry(connect, max_age=max_age, backoff=backoff, display=display, **kwargs)
