"""The Redis :class:`~celery_fleet.brokers.source.QueueDepthSource`: runs the poll over an injected
round trip, holds the in-flight walk to its share of Redis' time, and checks the key layout."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from celery_fleet.brokers.layout import unconfigured_lists
from celery_fleet.brokers.redis.poll import PollPlan, parse_poll, plan_poll, reply_items, reply_text
from celery_fleet.brokers.redis.scripts import (
    DEFAULT_SCAN_LIMIT,
    LAYOUT_SCAN_PAGES,
    SCAN_SCRIPT,
    Command,
    Reply,
    RoundTrip,
)
from celery_fleet.brokers.redis.target import RedisTarget, classify
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, KeyLayout, QueueRef, UnackedSummary

# Replies bigger than this (pairs + binding members) are parsed in a worker thread.
PARSE_OFF_LOOP_ITEMS: Final = 2_000
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

    Queue lengths are read on every poll. The ``unacked`` walk costs Redis ~10 µs per entry, so it
    is held to ``inflight_budget`` of Redis' time: after a walk that took d seconds the next one
    runs no sooner than d / inflight_budget later; polls in between reuse the last counts (their
    ``UnackedSummary.age_seconds`` says how old). With ~1,000 entries (~10 ms) that is every poll
    at a 1 s interval; at the 5,000-entry scan limit (~55 ms) every ~3 s.
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
        self._last: dict[int, tuple[PollPlan, list[Reply], DepthReading]] = {}
        self._previous: DepthReading | None = None  # the last reading handed out

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
        try:
            # The socket timeouts bound each connect/read; this bounds the whole poll (DNS included).
            replies = await self._scripts(plan.commands)
            took = self._clock() - started
            last = self._last.get(id(plan))
            if last is not None and last[0] is plan and last[1] == replies:
                # The same answer to the same commands (an idle fleet, most polls): nothing to parse,
                # and the same revision tells the pools their inputs did not change.
                reading = replace(last[2], duration_seconds=took)
            else:
                if reply_items(replies) > PARSE_OFF_LOOP_ITEMS:
                    # Routing thousands of in-flight pairs is CPU work: keep it off the event loop.
                    reading = await asyncio.to_thread(parse_poll, plan, replies, duration_seconds=took)
                else:
                    reading = parse_poll(plan, replies, duration_seconds=took)
                reading = replace(reading, revision=next(_REVISIONS))
                if len(self._last) >= 4:  # as many as plans are kept
                    self._last.clear()
                self._last[id(plan)] = (plan, replies, reading)
        except Exception as exc:
            raise classify(exc, self.target) from None
        reading = self._account(reading, names, skip, started)
        reading = replace(reading, changed_at=changes(self._previous, reading))
        self._previous = reading
        return reading

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
        self, reading: DepthReading, names: Mapping[KeyLayout, set[str]], skip: set[KeyLayout], started: float
    ) -> DepthReading:
        unacked = dict(reading.unacked)
        in_flight = dict(reading.in_flight)
        routes = dict(reading.in_flight_routes)
        stale = dict(reading.stale_routes)
        for p, queues in names.items():
            if p in skip:
                cached = self._scans[p]
                unacked[p] = replace(cached.summary, age_seconds=started - cached.at)
                in_flight.update({(p, q): n for q, n in cached.counts.items() if q in queues})
                for into, kept in ((routes, cached.routes), (stale, cached.stale)):
                    for qs, n in kept.items():
                        mine = qs & queues
                        if mine:
                            into[(p, mine)] = into.get((p, mine), 0) + n
            elif unacked[p].error is None:
                counts = {q: n for (pp, q), n in reading.in_flight.items() if pp == p}
                mine_routes = {qs: n for (pp, qs), n in reading.in_flight_routes.items() if pp == p}
                mine_stale = {qs: n for (pp, qs), n in reading.stale_routes.items() if pp == p}
                self._scans[p] = _Scan(unacked[p], counts, mine_routes, frozenset(queues), started, mine_stale)
        if len(skip) < len(names) and self.inflight_budget > 0:
            self._next_scan_at = started + reading.duration_seconds / self.inflight_budget
        return replace(reading, unacked=unacked, in_flight=in_flight, in_flight_routes=routes, stale_routes=stale)

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
