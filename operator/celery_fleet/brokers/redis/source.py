"""The Redis :class:`~celery_fleet.brokers.source.QueueDepthSource`: runs the poll over an injected
round trip, holds the in-flight walk to its share of Redis' time, and checks the key layout."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from redis import exceptions as rexc

from celery_fleet.brokers.layout import unconfigured_lists
from celery_fleet.brokers.redis.poll import PollPlan, parse_poll, plan_poll, reply_text
from celery_fleet.brokers.redis.resp import ReplyTooLarge
from celery_fleet.brokers.redis.scripts import (
    DEFAULT_SCAN_LIMIT,
    LAYOUT_SCAN_PAGES,
    SCAN_SCRIPT,
    Command,
    Reply,
    RoundTrip,
)
from celery_fleet.brokers.redis.target import RedisTarget, classify, first_line
from celery_fleet.brokers.routing import RoutingBudget
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, KeyLayout, QueueRef, UnackedSummary

# After our own script overran, the walk of `unacked` waits at most this long (then tries again).
MAX_WALK_PAUSE_SECONDS: Final = 300.0
_REVISIONS = itertools.count(1)  # unique over every source: a pool moving brokers never sees an old one


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True)
class _Scan:
    """The last in-flight count of one key prefix, reused while the scan budget recovers."""

    summary: UnackedSummary
    counts: Mapping[str, int]  # queue -> in flight, for `watched`
    routes: Mapping[frozenset[str], int]  # queues -> in flight (each delivery tag once)
    watched: frozenset[str]
    at: float
    stale: Mapping[frozenset[str], int]  # queues -> past the visibility timeout


@dataclass
class _Walk:
    """A walk of one layout's ``unacked_index`` that takes several polls (each EVAL within its
    budget): the sums so far, and where the next poll goes on."""

    watched: frozenset[str]
    next_rank: int = 0
    scanned: int = 0
    unattributed: int = 0
    too_large: int = 0
    unrouted: int = 0
    stopped: str = ""  # why the first EVAL of this walk stopped early
    routes: Counter[frozenset[str]] = field(default_factory=Counter)
    stale: Counter[frozenset[str]] = field(default_factory=Counter)

    def add(
        self, summary: UnackedSummary, routes: Mapping[frozenset[str], int], stale: Mapping[frozenset[str], int]
    ) -> None:
        self.scanned += summary.scanned
        self.unattributed += summary.unattributed
        self.too_large += summary.too_large
        self.unrouted += summary.unrouted
        self.stopped = self.stopped or summary.walk_stopped
        self.next_rank = summary.next_rank
        self.routes.update(routes)
        self.stale.update(stale)

    def summary(self, last: UnackedSummary) -> UnackedSummary:
        return replace(
            last, scanned=self.scanned, unattributed=self.unattributed, too_large=self.too_large,
            unrouted=self.unrouted, walk_stopped=self.stopped, next_rank=self.next_rank,
        )  # fmt: skip


def changes(previous: DepthReading | None, reading: DepthReading) -> Mapping[QueueRef, int]:
    """Each queue's last-changed revision: carried over where its reading is the same as before."""
    assert reading.revision is not None
    if previous is not None and previous.revision == reading.revision:
        return previous.changed_at
    rev = reading.revision
    if previous is None:
        return {r: rev for r in (*reading.queued, *reading.queue_errors)}
    if (
        reading.queued == previous.queued
        and reading.queue_errors == previous.queue_errors
        and reading.in_flight == previous.in_flight
        and reading.in_flight_routes == previous.in_flight_routes
        and reading.stale_routes == previous.stale_routes
        and reading.unacked.keys() == previous.unacked.keys()
        and all(_aged(s) == _aged(previous.unacked[p]) for p, s in reading.unacked.items())
    ):
        # Nothing changed (an idle fleet's polls, walking `unacked` or reusing the last walk): the same
        # mapping, so a pool can tell by identity that none of its queues changed.
        return previous.changed_at
    # A reused walk's age grows every poll; its counts are what matter.
    layouts_changed = {p for p, summary in reading.unacked.items()
                       if replace(summary, age_seconds=0.0) != _aged(previous.unacked.get(p))}  # fmt: skip
    names_changed = {k for k in reading.in_flight.keys() | previous.in_flight.keys()
                     if reading.in_flight.get(k) != previous.in_flight.get(k)}  # fmt: skip
    routes_changed = {k for k in reading.in_flight_routes.keys() | previous.in_flight_routes.keys()
                      if reading.in_flight_routes.get(k) != previous.in_flight_routes.get(k)}  # fmt: skip
    routes_changed |= {k for k in reading.stale_routes.keys() | previous.stale_routes.keys()
                       if reading.stale_routes.get(k) != previous.stale_routes.get(k)}  # fmt: skip
    for layout, queues in routes_changed:
        names_changed.update((layout, q) for q in queues)
    out: dict[QueueRef, int] = {}
    for r in (*reading.queued, *reading.queue_errors):
        before = previous.changed_at.get(r)
        same = (
            before is not None
            and reading.queued.get(r) == previous.queued.get(r)
            and reading.queue_errors.get(r) == previous.queue_errors.get(r)
            and (r.layout, r.name) not in names_changed
            and r.layout not in layouts_changed
        )
        out[r] = before if same and before is not None else rev
    return out


def _aged(summary: UnackedSummary | None) -> UnackedSummary | None:
    return None if summary is None else replace(summary, age_seconds=0.0)


class RedisDepthSource:
    """A :class:`~celery_fleet.brokers.source.QueueDepthSource` over one Redis broker.

    Queue lengths are read on every poll. Each EVAL's walk of ``unacked`` is bounded in bytes and
    Redis time (:class:`~celery_fleet.brokers.redis.scripts.WalkBudget`); a hash too big for one
    goes on from where it stopped at the next walk, and its counts are published when the walk
    reaches the end (until then, the last whole walk's, or the first partial one scaled up). Walks
    are held to ``inflight_budget`` of Redis' time: after one that took d seconds the next runs no
    sooner than d / inflight_budget later; polls in between reuse the last counts (their
    ``UnackedSummary.age_seconds`` says how old).

    Replies are parsed in a worker thread, one at a time, within ``parse_deadline_seconds``, and
    routing spends at most a :class:`~celery_fleet.brokers.routing.RoutingBudget` per poll.
    """

    def __init__(
        self,
        round_trip: RoundTrip,
        target: RedisTarget,
        *,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
        inflight_budget: float = 0.02,
        deadline_seconds: float = 3.0,
        close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        parse_deadline_seconds: float = 2.0,
        routing_steps: int = RoutingBudget.steps,
    ) -> None:
        self._round_trip = round_trip
        self.target = target
        self.scan_limit = scan_limit
        self.inflight_budget = inflight_budget
        self.deadline_seconds = deadline_seconds
        self._close = close
        self._clock = clock
        self._scans: dict[KeyLayout, _Scan] = {}
        self._next_scan_at = 0.0
        self._plans: dict[tuple[frozenset[QueueRef], frozenset[KeyLayout]], PollPlan] = {}
        self._layout_cursor = 0
        self._read_only_scripts = True
        self._ro: dict[int, tuple[Sequence[Command], Sequence[Command]]] = {}
        self._names_of: tuple[Collection[QueueRef], dict[KeyLayout, set[str]]] | None = None
        self._layout_found: dict[QueueRef, set[str]] = {}
        self._layout_seen: dict[QueueRef, set[str]] = {}
        # The last answer to each plan, parsed: polls alternate between walking `unacked` and not.
        self._last: dict[int, tuple[PollPlan, Sequence[Command], list[Reply], DepthReading]] = {}
        self._previous: DepthReading | None = None  # the last reading handed out
        self.parse_deadline_seconds = parse_deadline_seconds
        self.routing_steps = routing_steps
        self._walks: dict[KeyLayout, _Walk] = {}
        self._parsing: asyncio.Future[DepthReading] | None = None  # the one parse of this broker
        self._script_overran_at: float | None = None
        self._answered = False  # the broker has answered a poll: a later timeout may be our own script

    def __repr__(self) -> str:
        return f"RedisDepthSource({self.target.display})"

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        started = self._clock()
        names = self._names(refs)
        skip = {
            p
            for p, queues in names.items()
            if started < self._next_scan_at and p in self._scans and queues <= self._scans[p].watched
        }
        plan = self._plan(frozenset(refs), frozenset(skip))
        # Walks under way go on where they stopped (a walk whose queues changed starts again).
        ranks = {
            p: w.next_rank
            for p, w in self._walks.items()
            if p in names and p not in skip and w.watched == frozenset(names[p])
        }
        commands = plan.starting_at(ranks)
        walking = any(p.ack_emulation and p not in skip for p in names)
        try:
            # The socket timeouts bound each connect/read; this bounds the whole poll (DNS included).
            replies = await self._scripts(commands)
        except Exception as exc:
            raise self._failure(exc, walking, started) from None
        busy = self._busy(replies, walking, started)
        if busy is not None:
            raise busy
        self._answered = True
        took = self._clock() - started
        try:
            last = self._last.get(id(plan))
            if last is not None and last[0] is plan and last[1] == commands and last[2] == replies:
                # The same answer to the same commands (an idle fleet, most polls): nothing to parse,
                # and the same revision tells the pools their inputs did not change.
                reading = replace(last[3], duration_seconds=took)
            else:
                reading = await self._parse(plan, replies, took)
                reading = replace(reading, revision=next(_REVISIONS))
                if len(self._last) >= 4:  # as many as plans are kept
                    self._last.clear()
                self._last[id(plan)] = (plan, commands, replies, reading)
        except BrokerError as exc:
            scrubbed = classify(exc, self.target)
            scrubbed.retry_after = exc.retry_after  # an overrun parse says when to try again
            raise scrubbed from None
        reading = self._account(reading, names, skip, started, ranks)
        reading = replace(reading, changed_at=changes(self._previous, reading))
        self._previous = reading
        return reading

    async def _parse(self, plan: PollPlan, replies: list[Reply], took: float) -> DepthReading:
        """Tenant data is parsed in a worker thread, never on the event loop, one parse per broker at a
        time, within a deadline (a thread cannot be stopped: an overrun parse holds the next poll)."""
        running = self._parsing
        if running is not None and not running.done():
            raise BrokerError(
                ErrorKind.OWN_POLL_SLOW,
                f"the operator is still parsing an earlier reply of {self.target.display}",
                retry_after=self.parse_deadline_seconds,
            )
        budget = RoutingBudget(steps=self.routing_steps)
        parsing = self._parsing = asyncio.ensure_future(
            asyncio.to_thread(parse_poll, plan, replies, duration_seconds=took, budget=budget)
        )
        try:
            return await asyncio.wait_for(asyncio.shield(parsing), self.parse_deadline_seconds)
        except TimeoutError:
            parsing.add_done_callback(_retrieve)
            raise BrokerError(
                ErrorKind.OWN_POLL_SLOW,
                f"parsing the poll reply of {self.target.display} took over {self.parse_deadline_seconds:.1f}s",
                retry_after=self.parse_deadline_seconds,
            ) from None
        except Exception as exc:
            if isinstance(exc, BrokerError):
                raise
            raise BrokerError(ErrorKind.RESPONSE_ERROR, f"unexpected poll reply ({first_line(exc)})") from None

    def _pause_walks(self, started: float) -> float:
        """After our own script overran: no walk for a while (bounded), so what the poll keeps
        reading is the queue lengths; returns the pause."""
        now = self._clock()
        self._script_overran_at = now
        pause = min(MAX_WALK_PAUSE_SECONDS, (now - started) / self.inflight_budget if self.inflight_budget else 0)
        self._next_scan_at = max(self._next_scan_at, now + pause)
        return pause

    def _failure(self, exc: BaseException, walking: bool, started: float) -> BrokerError:
        if isinstance(exc, ReplyTooLarge):
            return BrokerError(ErrorKind.REPLY_TOO_LARGE, f"{self.target.display} answered the poll with {exc}")
        timed_out = isinstance(exc, rexc.TimeoutError | asyncio.TimeoutError | TimeoutError)
        if timed_out and walking and self._answered:
            # A broker that answered until our walk: most likely our script kept it from answering (a
            # broker gone silent is named at the next poll, which does not walk). Walk less for a while.
            pause = self._pause_walks(started)
            return BrokerError(
                ErrorKind.OWN_POLL_SLOW,
                f"the operator's poll script on {self.target.display} did not answer within its read timeout;"
                f" in-flight counts paused for {pause:.0f}s, queue lengths go on",
                retry_after=1.0,
            )
        return classify(exc, self.target)

    def _busy(self, replies: Sequence[Reply], walking: bool, started: float) -> BrokerError | None:
        """Redis answers BUSY to everyone while a script runs past busy-reply-threshold."""
        if not any(isinstance(r, rexc.ResponseError) and str(r).startswith("BUSY") for r in replies):
            return None
        overran = self._script_overran_at
        if walking or (overran is not None and self._clock() - overran < MAX_WALK_PAUSE_SECONDS):
            pause = self._pause_walks(started)
            return BrokerError(
                ErrorKind.OWN_POLL_SLOW,
                f"{self.target.display} is busy running a script, most likely the operator's own poll;"
                f" in-flight counts paused for {pause:.0f}s",
                retry_after=1.0,
            )
        return BrokerError(
            ErrorKind.RESPONSE_ERROR, f"{self.target.display} is busy running another client's script", retry_after=1.0
        )

    async def _scripts(self, commands: Sequence[Command]) -> list[Reply]:
        """Run the (read-only) scripts as EVAL_RO, so an ACL user needs no EVAL; EVAL on Redis < 7."""
        if self._read_only_scripts:
            ro = self._read_only(commands)
            replies = await asyncio.wait_for(self._round_trip(ro), self.deadline_seconds)
            unknown = [r for r in replies if isinstance(r, BaseException) and "unknown command" in str(r).lower()]
            if not unknown:
                return replies
            self._read_only_scripts = False  # Redis 6: no EVAL_RO
        return await asyncio.wait_for(self._round_trip(commands), self.deadline_seconds)

    def _names(self, refs: Collection[QueueRef]) -> dict[KeyLayout, set[str]]:
        """The queue names by key layout; the same answer for the same queues (every idle poll)."""
        kept = self._names_of
        if kept is not None and kept[0] is refs:
            return kept[1]
        names: dict[KeyLayout, set[str]] = defaultdict(set)
        for r in refs:
            names[r.layout].add(r.name)
        self._names_of = (refs, names)
        return names

    def _read_only(self, commands: Sequence[Command]) -> Sequence[Command]:
        """The same commands as EVAL_RO, the same object for the same plan (the round trip keeps its
        encoding by identity)."""
        kept = self._ro.get(id(commands))
        if kept is None or kept[0] is not commands:
            if len(self._ro) >= 8:
                self._ro.clear()
            kept = self._ro[id(commands)] = (
                commands,
                tuple(("EVAL_RO", *c[1:]) if c[0] == "EVAL" else c for c in commands),
            )
        return kept[1]

    def _plan(self, refs: frozenset[QueueRef], skip: frozenset[KeyLayout]) -> PollPlan:
        # Polls repeat the same queues: keep the plans (building one for 300 queues costs ~3 ms).
        plan = self._plans.get((refs, skip))
        if plan is None:
            if len(self._plans) >= 4:  # queues changed: forget the old ones
                self._plans.clear()
            plan = self._plans[(refs, skip)] = plan_poll(refs, self.scan_limit, skip)
        return plan

    def _account(
        self,
        reading: DepthReading,
        names: Mapping[KeyLayout, set[str]],
        skip: set[KeyLayout],
        started: float,
        ranks: Mapping[KeyLayout, int],
    ) -> DepthReading:
        unacked = dict(reading.unacked)
        in_flight = dict(reading.in_flight)
        routes = dict(reading.in_flight_routes)
        stale = dict(reading.stale_routes)
        for p, queues in names.items():
            if p not in skip and unacked[p].error is None:
                self._publish_walk(p, unacked[p], reading, frozenset(queues), started, ranks.get(p, 0))
            elif p not in skip:
                continue
            cached = self._scans[p]
            for name in [k for k in in_flight if k[0] == p]:
                del in_flight[name]
            for into in (routes, stale):
                for key in [k for k in into if k[0] == p]:
                    del into[key]
            age = started - cached.at
            unacked[p] = replace(cached.summary, age_seconds=age) if age > 0 else cached.summary
            in_flight.update({(p, q): n for q, n in cached.counts.items() if q in queues})
            for into, kept in ((routes, cached.routes), (stale, cached.stale)):
                for qs, n in kept.items():
                    mine = qs & queues
                    if mine:
                        into[(p, mine)] = into.get((p, mine), 0) + n
        if len(skip) < len(names) and self.inflight_budget > 0:
            self._next_scan_at = max(self._next_scan_at, started + reading.duration_seconds / self.inflight_budget)
        return replace(reading, unacked=unacked, in_flight=in_flight, in_flight_routes=routes, stale_routes=stale)

    def _publish_walk(
        self, p: KeyLayout, chunk: UnackedSummary, reading: DepthReading, watched: frozenset[str], at: float, rank: int
    ) -> None:
        """Add this poll's part of the walk; publish a finished walk, or keep the last one."""
        walk = self._walks.get(p)
        if walk is None or rank == 0 or walk.watched != watched:
            walk = self._walks[p] = _Walk(watched)  # a new walk from the start of the index
        walk.add(
            chunk,
            {qs: n for (pp, qs), n in reading.in_flight_routes.items() if pp == p},
            {qs: n for (pp, qs), n in reading.stale_routes.items() if pp == p},
        )
        kept = self._scans.get(p)
        if walk.next_rank != 0 and kept is not None and kept.watched == watched and kept.summary.next_rank == 0:
            return  # mid-walk: the last whole walk stands until this one ends
        routes, stale = dict(walk.routes), dict(walk.stale)
        summary = walk.summary(chunk)
        if walk.next_rank != 0 and walk.scanned and walk.scanned < chunk.size:
            # The first walk is not over: scale what it saw up to the whole hash.
            factor = chunk.size / walk.scanned
            routes = {q: math.ceil(n * factor) for q, n in routes.items()}
            stale = {q: math.ceil(n * factor) for q, n in stale.items()}
        counts: Counter[str] = Counter()
        for qs, n in routes.items():
            for q in qs:
                counts[q] += n
        self._scans[p] = _Scan(summary, dict(counts), routes, watched, at, stale)
        if walk.next_rank == 0:
            del self._walks[p]

    async def check_layout(
        self, refs: Collection[QueueRef], *, pages: int = LAYOUT_SCAN_PAGES
    ) -> dict[QueueRef, list[str]]:
        """Unconfigured priority-like lists of ``refs`` (see :mod:`~celery_fleet.brokers.layout`).

        A bounded SCAN (``pages`` pages) continuing where the last check stopped; the answer is what
        the last full pass over the keyspace found, plus anything found since. Raises BrokerError.
        """
        prefixes = {r.keyprefix for r in refs}
        match = glob_escape(next(iter(prefixes))) + "*" if len(prefixes) == 1 and "" not in prefixes else ""
        keys: list[str] = []
        try:
            for _ in range(pages):
                command = ("EVAL", SCAN_SCRIPT, 0, self._layout_cursor, match, 1000, 512)
                (reply,) = await self._scripts([command])
                if isinstance(reply, BaseException):
                    raise reply
                if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], list):
                    raise BrokerError(ErrorKind.RESPONSE_ERROR, "unexpected reply to the layout scan")
                self._layout_cursor = int(reply_text(reply[0]))
                keys += [reply_text(k) for k in reply[1]]
                if self._layout_cursor == 0:
                    break
        except Exception as exc:
            raise classify(exc, self.target) from None
        for ref, names in unconfigured_lists(keys, refs).items():
            self._layout_found.setdefault(ref, set()).update(names)
        answer = {r: sorted(self._layout_seen.get(r, set()) | self._layout_found.get(r, set())) for r in refs}
        if self._layout_cursor == 0:  # a full pass ended: it is the new truth
            self._layout_seen, self._layout_found = self._layout_found, {}
        return {r: names for r, names in answer.items() if names}

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()


def _retrieve(future: asyncio.Future[DepthReading]) -> None:
    # An overrun parse ends in its thread after nobody waits for it: mark its outcome seen.
    if not future.cancelled():
        future.exception()
