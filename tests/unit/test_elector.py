"""The elector's state machine and loop, driven by simulated time, a fake apiserver and a fake command.

No sleeps and no sockets: `FakeClock.wait` jumps time forward, and scheduled events stand in for
signals, partitions and other writers.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import random
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_fleet.elector.election import (
    Election,
    ElectionTimings,
    Lease,
    LeaseApiError,
    LeaseConflict,
    LeaseRecord,
    format_micro_time,
)
from celery_fleet.elector.loop import Elector
from celery_fleet.elector.process import Shutdown

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


class SimulationOver(AssertionError):
    pass


class FakeClock:
    """Monotonic seconds from 0; `wait` jumps to the next scheduled event (a 'signal') or the timeout."""

    def __init__(self, horizon: float = 600.0) -> None:
        self.now = 0.0
        self.horizon = horizon
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._idle_waits = 0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def advance(self, seconds: float) -> None:
        """Time spent inside a call (network latency, a hung request); what falls due meanwhile
        happens at its time (the fence's thread does not wait for the call to return)."""
        target = self.now + seconds
        while self._events and self._events[0][0] <= target:
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
        self.now = target

    def wait(self, seconds: float) -> None:
        target = self.now + max(0.0, seconds)
        if self._events and self._events[0][0] <= target:
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
        else:
            self.now = target
        self._idle_waits = self._idle_waits + 1 if seconds <= 0 else 0
        if self._idle_waits > 1000:
            raise SimulationOver(f"the elector is spinning without waiting at t={self.now:.3f}")
        if self.now > self.horizon:
            raise SimulationOver(f"the simulation passed its horizon ({self.horizon}s)")


@dataclass
class Write:
    at: float
    by: str
    record: LeaseRecord


class FakeApiServer:
    """One Lease object with resourceVersion semantics, shared by every client."""

    def __init__(self, clock: FakeClock, namespace: str = "ns", name: str = "beat") -> None:
        self.clock = clock
        self.namespace = namespace
        self.name = name
        self.body: dict[str, Any] | None = None
        self._rv = itertools.count(1)
        self.writes: list[Write] = []

    def lease(self) -> Lease | None:
        return None if self.body is None else Lease.from_body(copy.deepcopy(self.body))

    def record(self) -> LeaseRecord | None:
        lease = self.lease()
        return None if lease is None else lease.record

    def store(self, spec: dict[str, Any], by: str) -> Lease:
        if self.body is None:
            self.body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": {}}
        self.body["spec"] = dict(spec)
        self.body["metadata"]["resourceVersion"] = str(next(self._rv))
        lease = self.lease()
        assert lease is not None
        self.writes.append(Write(self.clock.now, by, lease.record))
        return lease

    def touch_metadata(self) -> None:
        """What a reconciler's label/owner update does: a new resourceVersion, same spec."""
        assert self.body is not None
        self.body["metadata"]["labels"] = {"touched": str(self.clock.now)}
        self.body["metadata"]["resourceVersion"] = str(next(self._rv))

    def hand_edit(self, **spec: Any) -> None:
        assert self.body is not None
        self.store({**self.body["spec"], **spec}, by="kubectl")

    def delete(self) -> None:
        self.body = None

    def other_holds(self, identity: str, duration: int = 15, transitions: int = 0) -> None:
        stamp = format_micro_time(self.clock.wall())
        self.store(
            LeaseRecord(identity, duration, stamp, stamp, transitions).to_spec(),
            by=identity,
        )

    def other_renews(self, identity: str, every: float, until: float) -> None:
        """Schedule renewals by another, healthy leader until `until`."""
        when = self.clock.now
        while when <= until:

            def renew() -> None:
                record = self.record()
                assert record is not None and record.holder == identity, "the scripted leader lost its lease"
                stamp = format_micro_time(self.clock.wall())
                self.store({**record.to_spec(), "renewTime": stamp}, by=identity)

            self.clock.at(when, renew)
            when += every

    def writes_by(self, identity: str) -> list[Write]:
        return [w for w in self.writes if w.by == identity]


class FakeLeaseApi:
    """One elector's view of the apiserver; can be cut off (refused or black-holed)."""

    def __init__(self, server: FakeApiServer, identity: str, latency: float = 0.005) -> None:
        self.server = server
        self.identity = identity
        self.latency = latency
        self.refused = False
        self.blackholed = False
        self.lose_next_response = False
        self.lose_replies = 0  # this many more writes land but their replies are lost
        # Scripted faults, by verb: the next such request fails with this HTTP status.
        self.fail_next: dict[str, int] = {}
        # The next request hangs this long, whatever its timeout (what a trickling apiserver did).
        self.hang_next: float | None = None
        self.calls: list[tuple[float, str, float]] = []

    def _network(self, verb: str, timeout: float) -> None:
        self.calls.append((self.server.clock.now, verb, timeout))
        if self.hang_next is not None:
            hang, self.hang_next = self.hang_next, None
            self.server.clock.advance(hang)
            raise LeaseApiError(f"{verb}: reply trickled in after {hang:g}s")
        if verb in self.fail_next:
            status = self.fail_next.pop(verb)
            self.server.clock.advance(self.latency)
            raise LeaseApiError(f"{verb}: HTTP {status}", status)
        if self.blackholed:
            self.server.clock.advance(timeout)
            raise LeaseApiError(f"{verb}: timed out")
        if self.refused:
            raise LeaseApiError(f"{verb}: connection refused")
        self.server.clock.advance(self.latency)

    def _reply(self, lease: Lease) -> Lease:
        if self.lose_next_response:
            self.lose_next_response = False
            raise LeaseApiError("reply lost: timed out")
        if self.lose_replies:
            self.lose_replies -= 1
            raise LeaseApiError("reply lost: timed out")
        return lease

    def get(self, timeout: float) -> Lease | None:
        self._network("GET", timeout)
        return self.server.lease()

    def create(self, record: LeaseRecord, timeout: float) -> Lease:
        self._network("POST", timeout)
        if self.server.body is not None:
            raise LeaseConflict("exists", 409)
        return self._reply(self.server.store(record.to_spec(), by=self.identity))

    def replace(self, lease: Lease, record: LeaseRecord, timeout: float) -> Lease:
        self._network("PUT", timeout)
        current = self.server.lease()
        if current is None:
            raise LeaseConflict("deleted", 404)
        if current.resource_version != lease.resource_version:
            raise LeaseConflict("stale", 409)
        return self._reply(self.server.store(record.to_spec(), by=self.identity))


class FakeCommand:
    """A command that exits `term_delay` after SIGTERM (never, if None) and at once on SIGKILL."""

    def __init__(self, clock: FakeClock, term_delay: float | None = 0.1, fails_to_start: bool = False) -> None:
        self.clock = clock
        self.term_delay = term_delay
        self.fails_to_start = fails_to_start
        self.starts: list[float] = []
        self.stops: list[float] = []
        self.signals: list[tuple[float, int]] = []
        self._exit: tuple[float, int] | None = None
        self._running = False
        self._pids = itertools.count(100)

    @property
    def running(self) -> bool:
        self.poll()
        return self._running

    def start(self) -> int:
        if self.fails_to_start:
            raise FileNotFoundError(2, "No such file or directory", "celery")
        assert not self._running, "started while already running"
        self._running = True
        self._exit = None
        self.starts.append(self.clock.now)
        return next(self._pids)

    def poll(self) -> int | None:
        if self._exit is None:
            return None
        when, code = self._exit
        if self.clock.now < when:
            return None
        if self._running:
            self._running = False
            self.stops.append(when)
        return code

    def signal(self, signum: int) -> None:
        self.signals.append((self.clock.now, signum))
        if not self._running or (self._exit is not None and self._exit[0] <= self.clock.now):
            return
        if signum == signal.SIGKILL:
            self._exit = (self.clock.now, -signal.SIGKILL)
        elif signum == signal.SIGTERM and self.term_delay is not None and self._exit is None:
            self._exit = (self.clock.now + self.term_delay, 0)

    def dies(self, when: float, code: int) -> None:
        def die() -> None:
            if self._running and self._exit is None:
                self._exit = (self.clock.now, code)

        self.clock.at(when, die)


class FakeFence:
    """The fence on simulated time: SIGTERM at the held deadline, SIGKILL `stop_grace` later,
    whatever the loop is doing (its actions run inside `advance`, as a thread would)."""

    def __init__(self, clock: Any, command: FakeCommand, stop_grace: float) -> None:
        self.clock = clock
        self.command = command
        self.stop_grace = stop_grace
        self.deadline: float | None = None
        self.fired_at: list[float] = []
        self._fired = False
        self._generation = 0

    def hold(self, deadline: float) -> None:
        self.deadline = deadline
        generation = self._generation
        self.clock.at(deadline, lambda: self._due(deadline, generation))

    def release(self) -> None:
        self.deadline = None
        self._fired = False
        self._generation += 1

    def fired(self) -> bool:
        return self._fired

    def _due(self, deadline: float, generation: int) -> None:
        if self.deadline != deadline or generation != self._generation:
            return  # moved by a renewal, or released
        self.deadline = None
        self._fired = True
        self.fired_at.append(self.clock.now)
        self.command.signal(signal.SIGTERM)

        def kill() -> None:
            if generation == self._generation:
                self.command.signal(signal.SIGKILL)

        self.clock.at(self.clock.now + self.stop_grace, kill)


@dataclass
class Rig:
    """One elector wired to fakes; `events` is its log as (time, event, fields)."""

    clock: FakeClock
    server: FakeApiServer
    api: FakeLeaseApi
    command: FakeCommand
    shutdown: Shutdown
    elector: Elector
    fence: FakeFence
    events: list[tuple[float, str, dict[str, object]]] = field(default_factory=list)

    def times(self, event: str) -> list[float]:
        return [t for t, e, _ in self.events if e == event]

    def names(self) -> list[str]:
        return [e for _, e, _ in self.events]

    def sigterm_at(self, when: float) -> None:
        self.clock.at(when, lambda: self.shutdown.request(signal.SIGTERM))


TIMINGS = ElectionTimings(duration=15, renew_deadline=10, retry_period=2, stop_grace=2.5)


def make_rig(
    identity: str = "me",
    timings: ElectionTimings = TIMINGS,
    clock: FakeClock | None = None,
    server: FakeApiServer | None = None,
    term_delay: float | None = 0.1,
    fails_to_start: bool = False,
) -> Rig:
    clock = clock or FakeClock()
    server = server or FakeApiServer(clock)
    api = FakeLeaseApi(server, identity)
    command = FakeCommand(clock, term_delay=term_delay, fails_to_start=fails_to_start)
    shutdown = Shutdown()
    events: list[tuple[float, str, dict[str, object]]] = []

    def emit(event: str, **fields: object) -> None:
        events.append((clock.now, event, fields))

    fence = FakeFence(clock, command, timings.stop_grace)
    elector = Elector(Election(identity, timings), api, command, clock, shutdown, emit, fence, jitter=lambda: 0.5)
    return Rig(clock, server, api, command, shutdown, elector, fence, events)


# =========================================================================== the pure election


def _lease(record: LeaseRecord, rv: str = "1") -> Lease:
    return Lease(record=record, resource_version=rv, body={"spec": record.to_spec()})


OTHER = LeaseRecord("other", 15, "t0", "t0", 4)


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        pytest.param(None, None, id="never-read-is-free"),
        pytest.param(LeaseRecord("", 1, "t", "t", 3), None, id="released-is-free-at-once"),
        pytest.param(LeaseRecord("", 0), None, id="never-held-is-free-at-once"),
        pytest.param(LeaseRecord("", 15, "t", "t", 3), 10.0 + 15, id="hand-cleared-holder-waits-its-duration"),
        pytest.param(OTHER, 10.0 + 15, id="held-waits-its-duration-from-our-observation"),
        pytest.param(LeaseRecord("other", 40, "t", "t"), 10.0 + 40, id="holders-longer-duration-is-respected"),
        pytest.param(LeaseRecord("other", 0, "t", "t"), 10.0 + 15, id="missing-duration-falls-back-to-ours"),
        pytest.param(LeaseRecord("me", 15, "t", "t"), 10.0 + 15, id="our-name-we-did-not-write-waits"),
    ],
)
def test_expiry_is_judged_from_our_own_observation(seen: LeaseRecord | None, expected: float | None) -> None:
    election = Election("me", TIMINGS)
    election.observe(None if seen is None else _lease(seen), now=10.0)
    assert election.expires_at() == expected


def test_an_unchanged_record_does_not_restart_the_expiry_clock() -> None:
    election = Election("me", TIMINGS)
    election.observe(_lease(OTHER, rv="1"), now=10.0)
    election.observe(_lease(OTHER, rv="2"), now=14.0)  # metadata-only change: same record
    assert election.expires_at() == 25.0
    renewed = LeaseRecord("other", 15, "t0", "t1", 4)
    election.observe(_lease(renewed, rv="3"), now=20.0)
    assert election.expires_at() == 35.0
    assert election.claim(now=34.9, wall=EPOCH) is None
    assert election.claim(now=35.0, wall=EPOCH) is not None


@pytest.mark.parametrize(
    ("seen", "leading", "expected_transitions", "expected_acquire"),
    [
        pytest.param(None, False, 0, "now", id="create"),
        pytest.param(LeaseRecord("", 1, "t0", "t0", 4), False, 5, "now", id="take-over-after-release"),
        pytest.param(LeaseRecord("me", 15, "t0", "t1", 4), True, 4, "t0", id="renew-keeps-acquire-and-count"),
    ],
)
def test_claim_counts_transitions_like_client_go(
    seen: LeaseRecord | None, leading: bool, expected_transitions: int, expected_acquire: str
) -> None:
    election = Election("me", TIMINGS)
    if seen is not None and leading:
        election.wrote(_lease(seen), sent_at=0.0, now=0.0)
    else:
        election.observe(None if seen is None else _lease(seen), now=0.0)
    claim = election.claim(now=0.0, wall=EPOCH)
    assert claim is not None
    stamp = format_micro_time(EPOCH)
    assert claim == LeaseRecord(
        "me", 15, stamp if expected_acquire == "now" else expected_acquire, stamp, expected_transitions
    )


def test_a_leader_that_sees_a_record_it_did_not_write_has_lost() -> None:
    election = Election("me", TIMINGS)
    election.wrote(_lease(LeaseRecord("me", 15, "t0", "t0", 0), rv="1"), sent_at=0.0, now=0.0)
    assert election.observe(_lease(LeaseRecord("me", 15, "t0", "t0", 0), rv="2"), now=1.0)
    assert election.leading
    assert not election.observe(_lease(LeaseRecord("me", 15, "t0", "HAND", 0), rv="3"), now=2.0)
    assert not election.leading
    assert election.release_record(EPOCH) is None


def test_micro_time_matches_the_apiserver_wire_form() -> None:
    assert format_micro_time(datetime(2025, 3, 4, 5, 6, 7, 89, tzinfo=UTC)) == "2025-03-04T05:06:07.000089Z"


# =========================================================================== the elector loop


def test_fresh_lease_is_created_renewed_and_released_on_sigterm() -> None:
    rig = make_rig()
    rig.sigterm_at(10.0)
    assert rig.elector.run() == 0

    assert len(rig.command.starts) == 1 and rig.command.starts[0] < 0.1
    assert rig.command.stops == [pytest.approx(10.1)]
    names = rig.names()
    assert names[names.index("shutdown") :] == ["shutdown", "cmd-stopping", "cmd-stopped", "released"]
    assert rig.times("released")[0] >= rig.command.stops[0], "released before the command had stopped"
    renewals = [w.at for w in rig.server.writes_by("me")]
    gaps = [b - a for a, b in itertools.pairwise(renewals[:-1])]
    assert gaps == [pytest.approx(2.0, abs=0.02)] * (len(renewals) - 2)
    final = rig.server.record()
    assert final is not None
    assert (final.holder, final.duration_seconds, final.transitions) == ("", 1, 0)


def test_standby_waits_for_a_renewing_leader_and_takes_over_within_duration_plus_retry() -> None:
    rig = make_rig()
    rig.server.other_holds("other", transitions=2)
    rig.server.other_renews("other", every=2, until=20)
    rig.sigterm_at(45.0)
    assert rig.elector.run() == 0

    last_renewal = rig.server.writes_by("other")[-1].at
    assert len(rig.command.starts) == 1
    started = rig.command.starts[0]
    assert last_renewal + 15 <= started <= last_renewal + 15 + 2 + 0.1
    acquired = next(w.record for w in rig.server.writes_by("me"))
    assert acquired.transitions == 3


@pytest.mark.parametrize(
    ("edit", "earliest", "latest"),
    [
        pytest.param({"holderIdentity": "", "leaseDurationSeconds": 1}, 11.0, 13.1, id="release-within-retry"),
        pytest.param({"holderIdentity": ""}, 26.0, 28.1, id="hand-cleared-holder-waits-duration"),
        pytest.param({"holderIdentity": "me"}, 26.0, 28.1, id="hand-set-to-us-waits-duration"),
    ],
)
def test_how_soon_an_emptied_or_edited_lease_is_taken(edit: dict[str, Any], earliest: float, latest: float) -> None:
    rig = make_rig()
    rig.server.other_holds("other")
    rig.server.other_renews("other", every=2, until=10)
    rig.clock.at(11.0, lambda: rig.server.hand_edit(**edit))
    rig.sigterm_at(40.0)
    rig.elector.run()
    assert len(rig.command.starts) == 1
    assert earliest <= rig.command.starts[0] <= latest


@pytest.mark.parametrize("mode", ["refused", "blackholed"])
def test_partitioned_leader_stops_before_anyone_could_see_the_lease_expire(mode: str) -> None:
    rig = make_rig()
    rig.clock.at(5.0, lambda: setattr(rig.api, mode, True))
    rig.clock.at(20.0, lambda: setattr(rig.api, mode, False))
    rig.sigterm_at(40.0)
    rig.elector.run()

    last_write = [w for w in rig.server.writes_by("me") if w.at < 20][-1]
    assert last_write.at == pytest.approx(4.0, abs=0.02)
    stopped = rig.command.stops[0]
    # Stopping begins at the renew deadline counted from when that write was sent...
    assert rig.times("lost")[0] == pytest.approx(4.0 + 10, abs=0.02)
    # ...and ends before a standby, which saw the write no earlier than it happened, may take over.
    assert stopped < last_write.at + 15
    assert "renew-failed" in rig.names()
    # Once reachable again, it is a candidate like any other and retakes its own stale lease after expiry.
    assert len(rig.command.starts) == 2
    assert rig.command.starts[1] >= last_write.at + 15
    retaken = next(w.record for w in rig.server.writes_by("me") if w.at >= 20)
    assert retaken.transitions == 1


def test_a_hand_edited_holder_stops_the_leader_at_its_next_renewal() -> None:
    rig = make_rig()
    rig.clock.at(5.0, lambda: rig.server.hand_edit(holderIdentity="intruder"))
    rig.sigterm_at(40.0)
    rig.elector.run()

    assert rig.command.stops[0] <= 5.0 + 2 + 0.2
    assert [e for _, e, f in rig.events if e == "lost"] == ["lost"]
    assert rig.events[[e for _, e, _ in rig.events].index("lost")][2]["reason"] == "lease-changed"
    # Nobody renews for the intruder: it expires 15 s after we saw it, and we take the lease back.
    assert rig.command.starts[1] >= 6.0 + 15
    assert rig.server.writes_by("me")[-2].record.transitions == 1


def test_metadata_changes_by_others_do_not_cost_the_leadership() -> None:
    rig = make_rig()
    rig.clock.at(3.0, rig.server.touch_metadata)
    rig.clock.at(7.0, rig.server.touch_metadata)
    rig.sigterm_at(12.0)
    rig.elector.run()
    assert len(rig.command.starts) == 1
    assert "lost" not in rig.names()


@pytest.mark.parametrize("when", [pytest.param(None, id="on-acquire"), pytest.param(3.0, id="on-renew")])
def test_a_write_whose_reply_was_lost_is_recognised_as_ours(when: float | None) -> None:
    rig = make_rig()
    if when is None:
        rig.api.lose_next_response = True
    else:
        rig.clock.at(when, lambda: setattr(rig.api, "lose_next_response", True))
    rig.sigterm_at(12.0)
    rig.elector.run()
    assert len(rig.command.starts) == 1
    assert "lost" not in rig.names()
    assert all(w.record.transitions == 0 for w in rig.server.writes_by("me"))


def test_a_deleted_lease_stops_the_leader_and_is_recreated_only_after_a_duration() -> None:
    rig = make_rig()
    rig.clock.at(5.0, rig.server.delete)
    rig.sigterm_at(40.0)
    rig.elector.run()
    assert rig.command.stops[0] <= 6.2
    assert rig.command.starts[1] >= 6.0 + 15


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param(3, 3, id="failure-code-passes-through"),
        pytest.param(-signal.SIGKILL, 137, id="killed-by-signal"),
        pytest.param(0, 1, id="clean-exit-is-still-a-failure"),
    ],
)
def test_when_the_command_dies_the_lease_is_released_and_the_exit_is_non_zero(code: int, status: int) -> None:
    rig = make_rig()
    rig.command.dies(7.0, code)
    assert rig.elector.run() == status
    assert rig.names()[-2:] == ["cmd-exited", "released"]
    record = rig.server.record()
    assert record is not None and record.holder == ""


def test_a_command_that_cannot_start_releases_and_exits_127() -> None:
    rig = make_rig(fails_to_start=True)
    assert rig.elector.run() == 127
    record = rig.server.record()
    assert record is not None and record.holder == ""


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    rig = make_rig(term_delay=None)
    rig.sigterm_at(5.0)
    rig.elector.run()
    assert [(round(t, 2), s) for t, s in rig.command.signals] == [(5.0, signal.SIGTERM), (7.5, signal.SIGKILL)]
    assert rig.command.stops == [pytest.approx(7.5)]


def test_sigterm_while_standing_by_writes_nothing() -> None:
    rig = make_rig()
    rig.server.other_holds("other")
    rig.server.other_renews("other", every=2, until=30)
    rig.sigterm_at(8.0)
    assert rig.elector.run() == 0
    assert rig.command.starts == []
    assert rig.server.writes_by("me") == []


def test_a_leaders_request_never_outlives_its_renew_deadline() -> None:
    rig = make_rig()
    rig.clock.at(5.0, lambda: setattr(rig.api, "blackholed", True))
    rig.sigterm_at(16.0)
    rig.elector.run()
    for at, verb, timeout in rig.api.calls:
        if 5.0 <= at < 14.0:
            assert at + timeout <= 14.0 + 1e-6, f"{verb} at {at} could run past the deadline"


# =========================================================================== two electors, simulated


class Simulation:
    """Several electors on one fake apiserver, interleaved deterministically in simulated time.

    Each elector runs in a thread, but only one runs at a time: a thread that waits hands the
    baton back and the scheduler wakes whichever elector is due first.
    """

    def __init__(self, identities: Sequence[str], timings: ElectionTimings, horizon: float) -> None:
        self.now = 0.0
        self.horizon = horizon
        self.server = FakeApiServer(self)  # type: ignore[arg-type]
        self._cv = threading.Condition()
        self._due: dict[str, float] = {}
        self._turn: str | None = None
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.rigs: dict[str, SimRig] = {}
        for identity in identities:
            self.rigs[identity] = SimRig(self, identity, timings)

    # the FakeClock surface FakeApiServer/FakeCommand use
    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._actions, (when, next(self._seq), action))

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait_for_turn(self, identity: str, seconds: float) -> None:
        rig = self.rigs.get(identity)
        if rig is not None:
            rig.idle_waits = rig.idle_waits + 1 if seconds <= 0 else 0
            if rig.idle_waits > 1000:
                raise SimulationOver(f"{identity} is spinning without waiting at t={self.now:.3f}")
        with self._cv:
            self._due[identity] = self.now + max(seconds, 1e-6)
            self._turn = None
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == identity)

    def run(self) -> None:
        threads = [threading.Thread(target=rig.run, daemon=True) for rig in self.rigs.values()]
        with self._cv:
            for identity in self.rigs:
                self._due[identity] = 0.0
        for thread in threads:
            thread.start()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._turn is None and len(self._due) == self._live())
                if not self._due:
                    break
                identity, due = min(self._due.items(), key=lambda item: (item[1], item[0]))
                while self._actions and self._actions[0][0] <= due:
                    when, _, action = heapq.heappop(self._actions)
                    self.now = max(self.now, when)
                    action()
                self.now = max(self.now, due)
                if self.now > self.horizon:
                    raise SimulationOver("simulation passed its horizon")
                del self._due[identity]
                self._turn = identity
                self._cv.notify_all()
        errors = [rig.error for rig in self.rigs.values() if rig.error is not None]
        if errors:
            raise errors[0]

    def _live(self) -> int:
        return sum(1 for rig in self.rigs.values() if not rig.finished)

    def finished(self, identity: str) -> None:
        with self._cv:
            self.rigs[identity].finished = True
            self._due.pop(identity, None)
            self._turn = None
            self._cv.notify_all()


class SimClock:
    def __init__(self, sim: Simulation, identity: str) -> None:
        self.sim = sim
        self.identity = identity
        self.now = 0.0  # FakeCommand reads `clock.now`

    def monotonic(self) -> float:
        return self.sim.now

    def wall(self) -> datetime:
        return self.sim.wall()

    def advance(self, seconds: float) -> None:
        self.sim.advance(seconds)

    def wait(self, seconds: float) -> None:
        self.sim.wait_for_turn(self.identity, seconds)


class _SimTime:
    """Gives FakeCommand the simulation's `now`."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    @property
    def now(self) -> float:
        return self.sim.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.sim.at(when, action)


class SimRig:
    def __init__(self, sim: Simulation, identity: str, timings: ElectionTimings) -> None:
        self.sim = sim
        self.identity = identity
        self.finished = False
        self.idle_waits = 0
        self.error: BaseException | None = None
        self.exit_status: int | None = None
        self.api = FakeLeaseApi(sim.server, identity)
        self.command = FakeCommand(_SimTime(sim))  # type: ignore[arg-type]
        self.shutdown = Shutdown()
        self.events: list[tuple[float, str]] = []

        def emit(event: str, **fields: object) -> None:
            self.events.append((sim.now, event))

        self.fence = FakeFence(_SimTime(sim), self.command, timings.stop_grace)
        self.elector = Elector(
            Election(identity, timings),
            self.api,
            self.command,
            SimClock(sim, identity),
            self.shutdown,
            emit,
            self.fence,
        )

    def run(self) -> None:
        self.sim.wait_for_turn(self.identity, 0.0)
        try:
            self.exit_status = self.elector.run()
        except BaseException as exc:  # surfaced by Simulation.run in the test's thread
            self.error = exc
        finally:
            self.sim.finished(self.identity)


def _running_intervals(rig: SimRig, end: float) -> list[tuple[float, float]]:
    starts = rig.command.starts
    stops = [*rig.command.stops, end][: len(starts)]
    return list(zip(starts, stops, strict=True))


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


@pytest.mark.parametrize("seed", range(12))
def test_two_electors_never_run_the_command_at_once_through_random_partitions(seed: int) -> None:
    rng = random.Random(seed)
    timings = ElectionTimings(duration=4, renew_deadline=3, retry_period=0.5, stop_grace=0.5)
    sim = Simulation(["a", "b"], timings, horizon=200.0)
    when = 1.0
    while when < 90:
        victim = sim.rigs[rng.choice("ab")]
        mode = rng.choice(["refused", "blackholed"])
        length = rng.uniform(0.2, 8.0)
        sim.at(when, lambda v=victim, m=mode: setattr(v.api, m, True))
        sim.at(when + length, lambda v=victim, m=mode: setattr(v.api, m, False))
        when += length + rng.uniform(0.5, 6.0)
    for rig in sim.rigs.values():
        sim.at(100.0, lambda r=rig: r.shutdown.request(signal.SIGTERM))
    sim.run()

    a, b = (_running_intervals(sim.rigs[x], 100.0) for x in "ab")
    assert _overlap(a, b) == 0.0, f"both ran beat at once: a={a} b={b}"
    assert a or b, "nobody ever led"
    assert all(rig.exit_status == 0 for rig in sim.rigs.values())


def test_two_electors_hand_over_on_sigterm_within_a_retry_period() -> None:
    timings = ElectionTimings(duration=4, renew_deadline=3, retry_period=0.5, stop_grace=0.5)
    sim = Simulation(["a", "b"], timings, horizon=60.0)
    sim.at(10.0, lambda: sim.rigs[leader()].shutdown.request(signal.SIGTERM))

    def leader() -> str:
        record = sim.server.record()
        assert record is not None
        return record.holder

    standby_shutdown = 20.0
    for rig in sim.rigs.values():
        sim.at(standby_shutdown, lambda r=rig: r.shutdown.request(signal.SIGTERM))
    sim.run()
    first, second = sorted(sim.rigs.values(), key=lambda r: r.command.starts[0] if r.command.starts else 99)
    assert len(first.command.starts) == 1 and len(second.command.starts) == 1
    gap = second.command.starts[0] - first.command.stops[0]
    assert 0 < gap <= 0.5 + 0.05


# =========================================================================== issue 13.4: leading means running


def test_an_adopted_acquire_then_a_failed_renewal_still_starts_the_command() -> None:
    """The reported sequence: the acquire's reply is lost, the next read adopts it as ours, the
    renewal in that round fails with a non-409 error. Every later round must still start beat."""
    rig = make_rig()
    rig.api.lose_next_response = True  # the acquire (a create here) lands; its reply does not
    rig.api.fail_next["PUT"] = 500  # the renewal right after the adopting GET fails
    rig.sigterm_at(12.0)
    rig.elector.run()

    adopted_at = rig.times("acquired")[0]
    assert rig.command.starts, f"the lease was held and the command never started: {rig.names()}"
    assert rig.command.starts[0] <= adopted_at + TIMINGS.retry_period + 0.1
    record = rig.server.record()
    assert record is not None and record.holder == ""  # released at the SIGTERM: it was ours all along


@pytest.mark.parametrize("fault", ["lost-reply", "http-500", "lost-reply-then-500"])
@pytest.mark.parametrize("at_call", range(6))
def test_whoever_holds_the_lease_runs_the_command_whatever_reply_went_missing(fault: str, at_call: int) -> None:
    """One elector alone: after any single fault it must end up leading AND running."""
    rig = make_rig()
    calls = {"n": 0}
    original = rig.api._network

    def network(verb: str, timeout: float) -> None:
        calls["n"] += 1
        if calls["n"] == at_call + 1:
            if fault in ("lost-reply", "lost-reply-then-500"):
                rig.api.lose_next_response = True
            if fault == "http-500":
                rig.api.fail_next[verb] = 500
            if fault == "lost-reply-then-500":
                rig.api.fail_next["PUT"] = 500
        original(verb, timeout)

    rig.api._network = network  # type: ignore[method-assign]
    seen: dict[str, object] = {}

    def look() -> None:
        record = rig.server.record()
        seen["holder"] = record.holder if record else None
        seen["running"] = rig.command.running

    rig.clock.at(20.0, look)
    rig.sigterm_at(21.0)
    rig.elector.run()
    assert seen == {"holder": "me", "running": True}, rig.names()
    assert len(rig.command.starts) == 1


def test_a_hung_renewal_cannot_keep_the_command_past_the_renew_deadline() -> None:
    """A request that ignores its timeout (48 s, as a trickling apiserver did): the fence, not the
    request, stops the command at the renew deadline."""
    rig = make_rig()
    rig.clock.at(5.0, lambda: setattr(rig.api, "hang_next", 48.0))
    rig.sigterm_at(70.0)
    rig.elector.run()

    last_renewal = max(w.at for w in rig.server.writes_by("me") if w.at < 6.0)
    deadline = last_renewal + TIMINGS.renew_deadline
    sigterm = next(t for t, s in rig.command.signals if s == signal.SIGTERM)
    assert sigterm == pytest.approx(deadline, abs=0.01)
    assert rig.command.stops[0] < last_renewal + TIMINGS.duration, "still running when a standby could acquire"
    assert rig.fence.fired_at == [pytest.approx(deadline, abs=0.01)]
    lost = next(f for _, e, f in rig.events if e == "lost")
    assert lost["reason"] == "renew-deadline"
    # Back from the hung call, it is a candidate and retakes its own expired lease: one command at a time.
    assert len(rig.command.starts) == 2 and rig.command.starts[1] >= last_renewal + TIMINGS.duration
