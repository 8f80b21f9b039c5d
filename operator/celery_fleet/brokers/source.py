"""What every queue-depth source reads, and how it fails: backend-neutral types and the Protocol."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from celery_fleet.api.models import CELERY_DEFAULT_QUEUE
from celery_fleet.planning.scaling import Observation, ReadFailure, TierObservation

DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
DEFAULT_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
DEFAULT_UNACKED_KEY = "unacked"
DEFAULT_UNACKED_INDEX_KEY = "unacked_index"  # kombu's unacked_index_key: delivery tag -> delivery time
DEFAULT_VISIBILITY_TIMEOUT = 3600  # kombu's visibility_timeout (seconds)


@dataclass(frozen=True, order=True)
class KeyLayout:
    """The kombu transport options that name a broker's keys, shared by the queues read together.

    One EVAL per layout per poll: queues of pools with the same options share it.
    """

    keyprefix: str = ""  # global_keyprefix
    sep: str = DEFAULT_SEP
    unacked_key: str = DEFAULT_UNACKED_KEY
    ack_emulation: bool = True  # False: kombu keeps no unacked hash, nothing is counted in flight
    fanout_exchanges: tuple[str, ...] = ()  # Redis does not store exchange types
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT  # unacked entries older than this are stale


@dataclass(frozen=True, order=True)
class QueueRef:
    """One Celery queue as it lives on the broker: its name, its key layout and its priority lists."""

    name: str
    keyprefix: str = ""
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    sep: str = DEFAULT_SEP
    unacked_key: str = DEFAULT_UNACKED_KEY
    ack_emulation: bool = True
    fanout_exchanges: tuple[str, ...] = ()
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT

    def __hash__(self) -> int:
        # Computed once: every poll puts each pool's queues in sets (a tuple hash of 8 fields each time).
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = self.__dict__["_hash"] = hash((
                self.name, self.keyprefix, self.priority_steps, self.sep, self.unacked_key, self.ack_emulation,
                self.fanout_exchanges, self.visibility_timeout,
            ))  # fmt: skip
        return cached

    @functools.cached_property
    def layout(self) -> KeyLayout:  # cached: asked for per queue per poll
        return KeyLayout(
            self.keyprefix, self.sep, self.unacked_key, self.ack_emulation, self.fanout_exchanges,
            self.visibility_timeout,
        )  # fmt: skip


def queue_refs(
    queues: Iterable[str],
    keyprefix: str = "",
    priority_steps: Iterable[int] = DEFAULT_PRIORITY_STEPS,
    *,
    layout: KeyLayout | None = None,
) -> list[QueueRef]:
    steps = tuple(priority_steps)
    lay = layout or KeyLayout(keyprefix)
    return [
        QueueRef(
            q,
            lay.keyprefix,
            steps,
            lay.sep,
            lay.unacked_key,
            lay.ack_emulation,
            lay.fanout_exchanges,
            lay.visibility_timeout,
        )
        for q in dict.fromkeys(queues)
    ]


def unconsumed_refs(
    tiers: Mapping[str, Sequence[QueueRef]], queues: Iterable[str] = (CELERY_DEFAULT_QUEUE,)
) -> list[QueueRef]:
    """`queues` (Celery's default queue) as a pool's tiers would read them, for those no tier consumes.

    Tasks sent without a route wait there; reading them costs one LLEN per priority step in the
    poll the tiers' queues already make, under the same key layout and priority steps.
    """
    any_ref = next((r for refs in tiers.values() for r in refs), None)
    if any_ref is None:
        return []
    consumed = {r.name for refs in tiers.values() for r in refs}
    return queue_refs([q for q in queues if q not in consumed], priority_steps=any_ref.priority_steps,
                      layout=any_ref.layout)  # fmt: skip


class ErrorKind(StrEnum):
    """Classes of broker failure; the value is the reason in conditions, Events and metric labels."""

    UNREACHABLE = "Unreachable"  # refused, DNS, TLS handshake, connection lost
    TIMEOUT = "Timeout"  # connect or read took longer than allowed
    AUTH_FAILED = "AuthFailed"  # wrong password/user, or the ACL user lacks a permission
    RESPONSE_ERROR = "ResponseError"  # the server answered with an error (e.g. WRONGTYPE)
    INVALID_URL = "InvalidUrl"  # the URL from the spec/Secret cannot be used
    REFUSED_BY_POLICY = "RefusedByPolicy"  # the operator's broker destination policy refuses the host
    # The operator's own poll work was slow (Redis answered BUSY or our read timed out while our
    # script ran; or parsing a reply overran): about us, not the broker; not retried before its budget allows.
    OWN_POLL_SLOW = "OwnPollSlow"
    REPLY_TOO_LARGE = "ReplyTooLarge"  # the server's reply passed the byte bound: refused unread


class BrokerError(Exception):
    """A failed read. ``str(error)`` is safe to log and publish: it never holds a URL or password."""

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.retry_after = retry_after  # seconds: the poller waits at least this long before the next try

    def as_failure(self) -> ReadFailure:
        return ReadFailure(self.kind.value, self.message)


@dataclass(frozen=True)
class UnackedSummary:
    """The ``unacked`` hash of one key prefix: how much of it was read to count in-flight work."""

    size: int  # HLEN
    scanned: int  # entries read; < size when the scan limit was hit and counts were extrapolated
    # Index entries older than the visibility timeout (kombu would restore them now): no live
    # worker holds them, so they are reported apart and not counted in flight.
    stale: int = 0
    unattributed: int = 0  # entries whose queue could not be determined (unparsable, unknown exchange)
    error: str | None = None  # the script failed; in-flight counts for this prefix are unknown
    age_seconds: float = 0.0  # > 0: counts reused from an earlier poll (the scan budget was spent)
    # What the cost budgets left out, each also counted in `unattributed`: values over the per-value
    # byte bound (sized, never read), and entries whose routing did not fit the per-poll match budget.
    too_large: int = 0
    unrouted: int = 0
    # Why the last walk stopped before the end of the index ("bytes", "time", "entries"; "" if it
    # did not), and where the next one starts: a big hash is covered over several polls.
    walk_stopped: str = ""
    next_rank: int = 0

    @property
    def exact(self) -> bool:
        return self.scanned >= self.size


@dataclass(frozen=True)
class DepthReading:
    """One poll of one broker.

    ``queued[ref][step]`` is the length of each priority list; ``in_flight[(layout, queue)]``
    counts the queue's messages in the layout's ``unacked`` hash (reserved by or running on a
    worker). One unacked entry that kombu routes to several queues (a shared routing key, a
    fanout) counts for each of them there, but once in ``in_flight_routes``, keyed by the set of
    queues it routes to: a tier sums those, so it counts every delivery tag once.
    Entries older than the visibility timeout are not in either: ``stale_routes`` has them, keyed
    the same way.
    """

    queued: Mapping[QueueRef, Mapping[int, int]]
    in_flight: Mapping[tuple[KeyLayout, str], int]
    unacked: Mapping[KeyLayout, UnackedSummary]
    duration_seconds: float = 0.0
    # Queues whose keys could not be read (e.g. WRONGTYPE: the name is taken by a non-list key).
    queue_errors: Mapping[QueueRef, str] = field(default_factory=dict)
    in_flight_routes: Mapping[tuple[KeyLayout, frozenset[str]], int] = field(default_factory=dict)
    stale_routes: Mapping[tuple[KeyLayout, frozenset[str]], int] = field(default_factory=dict)
    # Seconds since delivery of each in-flight entry (delivery tag -> age), per set of queues it routes
    # to, for the layouts whose whole `unacked_index` this poll walked (a wait target's run times).
    in_flight_ages: Mapping[KeyLayout, Mapping[frozenset[str], Mapping[str, float]]] = field(default_factory=dict)
    # Two readings with the same (not None) revision hold the same queue lengths and in-flight counts
    # (a source reuses it when the broker's answer was the same): an idle fleet's pools skip deciding.
    revision: int | None = None
    # The revision at which each queue's reading (lengths, in-flight count, errors) last changed, so
    # a pool whose queues did not change is not observed again when other pools' queues did.
    changed_at: Mapping[QueueRef, int] = field(default_factory=dict)

    def unchanged_since(self, revision: int, refs: Iterable[QueueRef]) -> bool:
        """Whether none of ``refs`` changed after ``revision`` (False when this reading cannot tell)."""
        if self.revision is None:
            return False
        changed_at = self.changed_at
        return all(r in changed_at and changed_at[r] <= revision for r in refs)

    def covers(self, refs: Iterable[QueueRef]) -> bool:
        return all(r in self.queued or r in self.queue_errors for r in refs)

    def depth(self, ref: QueueRef) -> int:
        return sum(self.queued.get(ref, {}).values())

    def observe(self, refs: Sequence[QueueRef]) -> TierObservation:
        """One tier's observation: queued and in-flight summed over its queues, or why not."""
        for r in refs:
            if r in self.queue_errors:
                return ReadFailure(ErrorKind.RESPONSE_ERROR.value, f"queue {r.name}: {self.queue_errors[r]}")
            if r not in self.queued:
                return ReadFailure(ErrorKind.RESPONSE_ERROR.value, f"queue {r.name} was not part of this poll")
        layouts = {r.layout for r in refs}
        exact = True
        for p in layouts:
            summary = self.unacked.get(p)
            if summary is None or summary.error is not None:
                why = summary.error if summary is not None else "not read"
                return ReadFailure(ErrorKind.RESPONSE_ERROR.value, f"in-flight count unknown: {why}")
            exact = exact and summary.exact
        unique = list(dict.fromkeys(refs))
        names: dict[KeyLayout, set[str]] = {}
        for r in unique:
            names.setdefault(r.layout, set()).add(r.name)
        if self.in_flight_routes or not self.in_flight:
            in_flight = sum(
                n
                for (layout, queues), n in self.in_flight_routes.items()
                if not names.get(layout, set()).isdisjoint(queues)
            )
        else:  # a reading built without routes (tests, other sources): per-queue counts
            in_flight = sum(self.in_flight.get((r.layout, r.name), 0) for r in unique)
        stale = sum(
            n for (layout, queues), n in self.stale_routes.items() if not names.get(layout, set()).isdisjoint(queues)
        )
        ages: dict[str, float] | None = None
        if all(p in self.in_flight_ages for p in layouts):
            ages = {}
            for p in layouts:
                for queues, tags in self.in_flight_ages[p].items():
                    if not names.get(p, set()).isdisjoint(queues):
                        ages.update(tags)
        return Observation(
            queue_depth=sum(self.depth(r) for r in unique),
            in_flight=in_flight,
            in_flight_exact=exact,
            stale_unacked=stale,
            in_flight_ages=ages,
        )


class QueueDepthSource(Protocol):
    """A broker that can report the depth and in-flight count of queues in one round trip."""

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        """Read every priority list of every queue and the in-flight counts; raise BrokerError."""
        ...

    async def aclose(self) -> None: ...


def observe_tiers(
    result: DepthReading | BrokerError, tiers: Mapping[str, Sequence[QueueRef]]
) -> dict[str, TierObservation]:
    """Turn one poll (or its failure) into the per-tier observations `planning.scaling.decide` takes."""
    if isinstance(result, BrokerError):
        failure = result.as_failure()
        return dict.fromkeys(tiers, failure)
    return {name: result.observe(refs) for name, refs in tiers.items()}
