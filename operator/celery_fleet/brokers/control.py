"""Celery remote control for scale-in: ask a tier's workers what they hold, drain the ones that go.

Why Celery's own control API (kombu's pidbox) and not our own pidbox client on the Redis we
already read: the wire format (fanout exchange ``celery.pidbox``, per-node queues, reply tickets,
the reply exchange, kombu's binding tables, ``global_keyprefix``) is kombu's to change between
releases, and ``app.control.broadcast`` works with a bare ``Celery(broker=url)``: it needs none
of the user's code. What it costs: kombu is synchronous, so every call runs in this module's own
small thread pool (never on the asyncio loop), and a reply is decoded by kombu before we see it,
so its size is bounded only by Redis's own limits; we accept JSON only (never pickle), read only
replies of the nodes we asked, and keep nothing of them but bounded counts.

One call per decision, never per poll: :meth:`CeleryControl.census` sends ``active`` to the
tier's nodes (``destination`` = ``celery@<pod>``, returning as soon as all answered or after
``timeout``), then ``reserved`` and ``scheduled`` to those that answered. A node that stays
silent is looked up in kombu's binding table of the pidbox exchange (one SMEMBERS): present, it
has remote control and is stuck or stopped (busy); absent, its app runs with remote control off.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery_fleet.brokers.redis.connection import TlsSettings
from celery_fleet.planning.scale_in import WorkerReport, hostname

log = logging.getLogger(__name__)

__all__ = [
    "CENSUS_TIMEOUT_SECONDS",
    "CeleryControl",
    "ControlError",
    "ControlTarget",
    "WorkerControl",
    "confirmed",
    "count_replies",
    "take_census",
]

# How long a census waits for a silent node (an answer from every node ends it at once).
CENSUS_TIMEOUT_SECONDS = 2.0
PIDBOX_EXCHANGE = "celery.pidbox"  # kombu Mailbox("celery") -> exchange "celery.pidbox"
# A reply naming more tasks than this is counted as this many (a count is all we keep).
MAX_TASKS_COUNTED = 100_000
# Celery apps kept (one per broker URL and key prefix): each holds a small connection pool.
MAX_APPS = 32


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


# -- reply handling (pure: worker replies are untrusted input) -------------------------------------

Broadcast = Callable[[str, Mapping[str, Any], list[str]], list[Any]]


def _replies(replies: Any, expected: Iterable[str]) -> Iterable[tuple[str, Any]]:
    """(node, value) of each well-formed reply from a node we asked; anything else is ignored."""
    wanted = set(expected)
    if not isinstance(replies, list):
        return
    for item in replies[: len(wanted) * 2 + 1]:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((node, value),) = item.items()
        if isinstance(node, str) and node in wanted:
            yield node, value


def count_replies(replies: Any, expected: Iterable[str]) -> dict[str, int]:
    """Node -> how many tasks its reply lists (``active``, ``reserved``, ``scheduled``)."""
    out: dict[str, int] = {}
    for node, value in _replies(replies, expected):
        if isinstance(value, list) and node not in out:
            out[node] = min(len(value), MAX_TASKS_COUNTED)
    return out


def confirmed(replies: Any, expected: Iterable[str]) -> set[str]:
    """Nodes that answered a consumer command with ``{"ok": ...}``."""
    return {node for node, value in _replies(replies, expected) if isinstance(value, dict) and "ok" in value}


def take_census(
    broadcast: Broadcast, pidbox_queues: Callable[[], set[str]], pods: Sequence[str]
) -> dict[str, WorkerReport]:
    """The census protocol over injected I/O (see the module docstring)."""
    nodes = {hostname(p): p for p in pods}
    active = count_replies(broadcast("active", {}, list(nodes)), nodes)
    answered = [n for n in nodes if n in active]
    reserved: dict[str, int] = {}
    scheduled: dict[str, int] = {}
    if answered:
        reserved = count_replies(broadcast("reserved", {}, answered), answered)
        scheduled = count_replies(broadcast("scheduled", {}, answered), answered)
    silent = [n for n in nodes if n not in active]
    queues = pidbox_queues() if silent else set()
    reports: dict[str, WorkerReport] = {}
    for node, pod in nodes.items():
        if node in active:
            # A node that answered `active` but not the follow-ups is treated as silent (busy).
            whole = node in reserved and node in scheduled
            reports[pod] = WorkerReport(
                pod, answered=whole, active=active[node], reserved=reserved.get(node, 0),
                scheduled=scheduled.get(node, 0),
            )  # fmt: skip
        else:
            reports[pod] = WorkerReport(pod, answered=False, remote_control=f"{node}.{PIDBOX_EXCHANGE}" in queues)
    return reports


# -- the Celery/kombu side --------------------------------------------------------------------------


class CeleryControl:
    """:class:`WorkerControl` over ``celery.app.control`` with a bare app per broker target."""

    def __init__(self, timeout: float = CENSUS_TIMEOUT_SECONDS, threads: int = 4) -> None:
        self.timeout = timeout
        self.broadcasts = 0  # counted for the cost report
        # Few threads: kombu names reply queues per thread, and blocking calls stay off the loop.
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="celery-control")
        self._apps: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def _app(self, target: ControlTarget) -> Any:
        from celery import Celery

        key = (target.url, target.global_keyprefix, target.master_name or "")
        with self._lock:
            app = self._apps.get(key)
            if app is not None:
                self._apps.move_to_end(key)
                return app
            options: dict[str, Any] = {"socket_timeout": self.timeout + 3, "socket_connect_timeout": self.timeout}
            if target.global_keyprefix:
                options["global_keyprefix"] = target.global_keyprefix
            if target.master_name:
                options["master_name"] = target.master_name
            app = Celery("celery-fleet-control", broker=target.url, set_as_current=False)
            app.conf.update(
                broker_transport_options=options,
                accept_content=["json"],  # worker replies are untrusted: never unpickle them
                task_serializer="json",
                broker_connection_retry=False,
                broker_connection_retry_on_startup=False,
                broker_connection_max_retries=0,
                broker_connection_timeout=self.timeout,
                broker_pool_limit=2,
            )
            self._apps[key] = app
            while len(self._apps) > MAX_APPS:
                _, old = self._apps.popitem(last=False)
                old.close()
            return app

    def _run(self, target: ControlTarget, work: Callable[[Any, Any], Any]) -> Any:
        app = self._app(target)
        try:
            with app.connection_for_write() as conn:
                return work(app, conn)
        except Exception as exc:  # kombu/redis raise many kinds; none may leak the URL
            raise ControlError(f"remote control failed ({type(exc).__name__})") from None

    def _broadcaster(self, app: Any, conn: Any) -> Broadcast:
        def broadcast(command: str, arguments: Mapping[str, Any], destination: list[str]) -> list[Any]:
            self.broadcasts += 1
            reply = app.control.broadcast(
                command, arguments=dict(arguments), destination=destination, connection=conn, reply=True,
                timeout=self.timeout, limit=len(destination),
            )  # fmt: skip
            return list(reply or [])

        return broadcast

    def _census(self, target: ControlTarget, pods: Sequence[str]) -> dict[str, WorkerReport]:
        def work(app: Any, conn: Any) -> dict[str, WorkerReport]:
            def pidbox_queues() -> set[str]:
                table = conn.default_channel.get_table(PIDBOX_EXCHANGE)
                return {str(row[2]) for row in table if isinstance(row, (list, tuple)) and len(row) == 3}

            return take_census(self._broadcaster(app, conn), pidbox_queues, pods)

        result: dict[str, WorkerReport] = self._run(target, work)
        return result

    def _consumers(self, command: str, target: ControlTarget, pods: Sequence[str], queues: Sequence[str]) -> set[str]:
        nodes = {hostname(p): p for p in pods}

        def work(app: Any, conn: Any) -> set[str]:
            broadcast = self._broadcaster(app, conn)
            ok = set(nodes)
            for queue in queues:
                ok &= confirmed(broadcast(command, {"queue": queue}, list(nodes)), nodes)
            return {nodes[n] for n in ok}

        result: set[str] = self._run(target, work)
        return result

    async def census(
        self, target: ControlTarget, pods: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, WorkerReport]:
        if not pods:
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._census, target, list(pods))

    async def cancel_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        if not pods:
            return set()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._consumers, "cancel_consumer", target, list(pods), list(queues)
        )

    async def add_consumer(
        self, target: ControlTarget, pods: Sequence[str], queues: Sequence[str], *, deadline: float | None = None
    ) -> set[str]:
        if not pods:
            return set()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._consumers, "add_consumer", target, list(pods), list(queues)
        )

    def close(self) -> None:
        with self._lock:
            for app in self._apps.values():
                app.close()
            self._apps.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
