"""Celery remote control for scale-in: ask a tier's workers what they hold, drain the ones that go.

Spoken with our own pidbox client (:mod:`celery_fleet.brokers.redis.pidbox`) on the Redis
clients every other read uses (:func:`~celery_fleet.brokers.redis.connection.open_clients`), so
TLS, Sentinel, ``sep`` and the key prefix come from the pool's one connection setting. Not
kombu's Mailbox: it cannot bound a reply in bytes before decoding it, keeps replies for other
tickets, opens a pool per target, imports celery lazily in threads and builds TLS from the URL.

One call per decision, never per poll: :meth:`PidboxControl.census` sends ``active``,
``reserved``, ``scheduled`` and ``active_queues`` to the tier's nodes (``destination`` =
``celery@<pod>``) in one round with one absolute deadline. A node that has not answered all four
by then is looked up in kombu's binding table of the pidbox exchange (SISMEMBER per node): bound,
it has remote control and is stuck or stopped (busy); unbound, its app runs with remote control
off. Any failure of the path raises :class:`ControlError`: the caller holds the scale-in
(unknown), never takes the workers for idle.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery_fleet.brokers.destination import DestinationCheck
from celery_fleet.brokers.redis.connection import BrokerClients, TlsSettings, open_clients
from celery_fleet.brokers.redis.pidbox import Call, Mailbox, PidboxClient, PidboxError, RequestResult
from celery_fleet.brokers.redis.target import classify
from celery_fleet.brokers.source import BrokerError
from celery_fleet.planning.broker_policy import BrokerPolicy
from celery_fleet.planning.scale_in import WorkerReport, hostname

__all__ = [
    "CENSUS_TIMEOUT_SECONDS",
    "ControlError",
    "ControlTarget",
    "PidboxControl",
    "WorkerControl",
    "census_reports",
    "confirmed",
]

# How long a census waits for a silent node when the caller gives no deadline.
CENSUS_TIMEOUT_SECONDS = 2.0
# Brokers with an open control client; the least recently used is closed past this.
MAX_BROKERS = 64
# Requests in flight per broker; each holds a pooled connection only for its round trips.
PER_BROKER = 16
CENSUS_CALLS = (Call("active"), Call("reserved"), Call("scheduled"), Call("active_queues"))


class ControlError(Exception):
    """The broker could not carry the command (down, refused, unreadable reply)."""


@dataclass(frozen=True)
class ControlTarget:
    """Where a tier's workers listen. ``url`` may hold a password: never log or publish it."""

    url: str = field(repr=False)
    global_keyprefix: str = ""
    master_name: str | None = None  # Redis Sentinel
    # The same TLS settings the poller uses (spec.broker.tls resolved): one source for both paths.
    tls: TlsSettings | None = field(default=None, repr=False)
    sep: str = "\x06\x16"  # kombu's binding-table separator (spec.broker.sep)


class WorkerControl(Protocol):
    """What scale-in needs from the workers; the autoscaler gets one injected."""

    broadcasts: int

    async def census(
        self, target: ControlTarget, pods: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, WorkerReport]:
        """One report per pod (``ready`` left True: the caller knows readiness). ``deadline``: an
        absolute ``time.monotonic()`` by which the whole census returns (silent nodes unanswered)."""
        ...

    async def cancel_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        """Stop the pods' workers consuming ``queues``; returns the pods that confirmed."""
        ...

    async def add_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        """Undo a drain; returns the pods that confirmed."""
        ...


# -- turning answers into reports (pure) -----------------------------------------------------------


def census_reports(nodes: Mapping[str, str], result: RequestResult) -> dict[str, WorkerReport]:
    """One report per pod from the answers to :data:`CENSUS_CALLS`: a node that missed any of the
    four counts as silent (busy, unless it has no pidbox binding and nothing was dropped unread:
    remote control off)."""
    reports: dict[str, WorkerReport] = {}
    for node, pod in nodes.items():
        got = [result.answers.get((i, node)) for i in range(len(CENSUS_CALLS))]
        active, reserved, scheduled, queues = got
        if isinstance(active, int) and isinstance(reserved, int) and isinstance(scheduled, int) and queues is not None:
            reports[pod] = WorkerReport(
                pod, active=active, reserved=reserved, scheduled=scheduled, queues=frozenset(queues)
            )
        else:
            # A reply dropped unread may be this node's: then it has remote control (busy).
            bound = result.bound.get(node, True) or result.dropped > 0
            reports[pod] = WorkerReport(pod, answered=False, remote_control=bound)
    return reports


def confirmed(nodes: Mapping[str, str], queues: Sequence[str], result: RequestResult) -> set[str]:
    """Pods whose worker answered ``ok`` for every queue (call ``i`` is ``queues[i]``)."""
    calls = range(len(queues))
    return {pod for node, pod in nodes.items() if all(result.answers.get((i, node)) is True for i in calls)}


# -- the client ------------------------------------------------------------------------------------


def _mailbox(target: ControlTarget, clients: BrokerClients) -> Mailbox:
    return Mailbox(
        keyprefix=target.global_keyprefix, sep=target.sep, db=clients.target.db, sentinel=clients.sentinel is not None
    )


@dataclass
class _Broker:
    pidbox: PidboxClient
    slots: asyncio.Semaphore
    destination: DestinationCheck | None = None  # the broker destination policy, as on the poll path
    users: int = 0
    evicted: bool = False


def _key(target: ControlTarget) -> tuple[Any, ...]:
    return (target.url, target.global_keyprefix, target.master_name, target.tls, target.sep)


@dataclass
class PidboxControl:
    """:class:`WorkerControl` over :mod:`~celery_fleet.brokers.redis.pidbox`, one client per broker
    (an LRU of at most ``max_brokers``, closed when evicted), ``per_broker`` requests at a time."""

    timeout: float = CENSUS_TIMEOUT_SECONDS
    max_brokers: int = MAX_BROKERS
    per_broker: int = PER_BROKER
    connect_timeout: float = 1.0
    read_timeout: float = 2.0
    broadcasts: int = 0  # commands published, for the cost report
    commands: int = 0  # Redis commands sent, for the cost report
    dropped: int = 0  # replies over a byte budget, dropped unread
    # Keyed by the target, URL (and password) included: never in a repr.
    _brokers: collections.OrderedDict[tuple[Any, ...], _Broker] = field(
        default_factory=collections.OrderedDict, repr=False
    )
    _closing: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    # The operator's broker destination policy: the control path connects only where a poll may
    # (a drain resumed after a restart must not reach a broker the policy refuses).
    policy: BrokerPolicy | None = None

    async def census(
        self, target: ControlTarget, pods: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, WorkerReport]:
        if not pods:
            return {}
        nodes = {hostname(p): p for p in pods}
        result = await self._request(target, CENSUS_CALLS, list(nodes), deadline)
        return census_reports(nodes, result)

    async def cancel_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        return await self._consumers("cancel_consumer", target, pods, queues, deadline)

    async def add_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        return await self._consumers("add_consumer", target, pods, queues, deadline)

    async def _consumers(
        self, method: str, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], deadline: float | None
    ) -> set[str]:
        if not pods:
            return set()
        nodes = {hostname(p): p for p in pods}
        calls = [Call(method, {"queue": q}) for q in queues]
        result = await self._request(target, calls, list(nodes), deadline)
        return confirmed(nodes, queues, result)

    async def _request(
        self, target: ControlTarget, calls: Sequence[Call], nodes: list[str], deadline: float | None
    ) -> RequestResult:
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        broker = self._acquire(target)
        try:
            if broker.destination is not None:
                try:
                    await broker.destination.check()
                except BrokerError as err:
                    raise ControlError(err.message) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError("remote control: the deadline passed before a slot on the broker was free")
            try:
                await asyncio.wait_for(broker.slots.acquire(), remaining)
            except TimeoutError:
                raise ControlError("remote control: the deadline passed before a slot on the broker was free") from None
            try:
                self.broadcasts += len(calls)
                result = await broker.pidbox.request(calls, nodes, deadline)
            except PidboxError as err:
                # Name the cause as the poller does (TLS refused, timeout, auth...), never the URL.
                cause = err.__cause__
                raise ControlError(
                    classify(cause, broker.pidbox.clients.target).message if cause else str(err)
                ) from None
            finally:
                broker.slots.release()
        finally:
            await self._release(broker)
        self.commands += result.commands
        self.dropped += result.dropped
        return result

    def _acquire(self, target: ControlTarget) -> _Broker:
        key = _key(target)
        broker = self._brokers.get(key)
        if broker is None:
            try:
                destination = None if self.policy is None else DestinationCheck(target.url, self.policy)
                clients = open_clients(
                    target.url, tls=target.tls, master_name=target.master_name,
                    connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                    max_connections=self.per_broker,
                )  # fmt: skip
            except BrokerError as err:
                raise ControlError(err.message) from None  # already scrubbed of secrets
            broker = _Broker(
                PidboxClient(clients, _mailbox(target, clients)), asyncio.Semaphore(self.per_broker), destination
            )
            self._brokers[key] = broker
            while len(self._brokers) > self.max_brokers:
                _, old = self._brokers.popitem(last=False)
                old.evicted = True
                if old.users == 0:
                    closing = asyncio.get_running_loop().create_task(old.pidbox.clients.aclose())
                    self._closing.add(closing)  # a task nobody holds may be collected before it runs
                    closing.add_done_callback(self._closing.discard)
        self._brokers.move_to_end(key)
        broker.users += 1
        return broker

    async def _release(self, broker: _Broker) -> None:
        broker.users -= 1
        if broker.evicted and broker.users == 0:
            await broker.pidbox.clients.aclose()

    def open_brokers(self) -> int:
        return len(self._brokers)

    async def aclose(self) -> None:
        brokers, self._brokers = list(self._brokers.values()), collections.OrderedDict()
        for broker in brokers:
            await broker.pidbox.clients.aclose()
