"""Two electors, one Lease, real `celery beat`: exactly one scheduler, through kills, handovers,
partitions and hand edits.

Each elector runs as a subprocess the way a pod runs it (the standalone single-file elector, admin
credentials from the local kubeconfig, short timings). Beat sends a task on every whole
wall-clock second; the messages stay in Redis, so duplicates and gaps are read off the broker,
and the electors' own log timestamps say when each beat started and stopped.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.leader import endpoint_from_kubeconfig
from tests.support.beatapp import (
    BeatElector,
    TickReport,
    Timings,
    analyse_ticks,
    overlap_seconds,
    read_ticks,
    start_beat_elector,
)
from tests.support.cluster import Cluster
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

TIMINGS = Timings(duration=4, renew_deadline=3, retry_period=0.5)
# Process start-up, apiserver round trips and a busy 2-core machine.
SLACK = 0.75
# From spawning `celery beat` to its first tick: interpreter + Celery import + the next whole second.
BEAT_STARTUP = 4.0
LEASE = "beat"


class BeatRig:
    def __init__(self, cluster: Cluster, namespace: str, redis_server: RedisServer, workdir: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.redis = redis_server.client()
        self.broker_url = redis_server.url
        self.workdir = workdir
        self.electors: dict[str, BeatElector] = {}
        self.proxies: list[TcpProxy] = []
        server = urllib.parse.urlsplit(endpoint_from_kubeconfig(str(cluster.kubeconfig), None)[0].server)
        assert server.hostname is not None and server.port is not None
        self.apiserver = (server.hostname, server.port)

    def start(self, identity: str, via_proxy: bool = False) -> BeatElector:
        server = None
        if via_proxy:
            proxy = TcpProxy(*self.apiserver).start()
            self.proxies.append(proxy)
            server = proxy.url
        elector = start_beat_elector(
            identity,
            workdir=self.workdir,
            kubeconfig=self.cluster.kubeconfig,
            namespace=self.namespace,
            lease=LEASE,
            broker_url=self.broker_url,
            server=server,
            timings=TIMINGS,
        )
        self.electors[identity] = elector
        return elector

    def leader(self, timeout: float = 20, other_than: BeatElector | None = None) -> BeatElector:
        """Wait for the elector running beat (one that is not `other_than`); never two at once."""

        def one_leading() -> BeatElector | None:
            leading = [e for e in self.electors.values() if e.is_leading()]
            assert len(leading) <= 1, f"two electors run beat: {[e.identity for e in leading]}"
            return leading[0] if leading and leading[0] is not other_than else None

        return wait_for(one_leading, timeout=timeout, message=self.describe)

    def wait_ticks_from(self, identity: str, count: int, timeout: float = 20) -> None:
        wait_for(
            lambda: sum(t.sender == identity for t in read_ticks(self.redis)) >= count,
            timeout=timeout,
            message=lambda: f"{count} ticks from {identity}: {self.describe()}",
        )

    def lease(self) -> dict[str, Any]:
        out = self.cluster.kubectl("get", "lease", LEASE, "-n", self.namespace, "-o", "json").stdout
        return dict(json.loads(out))

    def ticks(self) -> TickReport:
        return analyse_ticks(read_ticks(self.redis))

    def assert_never_two_beats(self) -> None:
        now = time.time()
        intervals = {i: e.running_intervals(now) for i, e in self.electors.items()}
        names = sorted(intervals)
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                overlap = overlap_seconds(intervals[names[x]], intervals[names[y]])
                assert overlap == 0, f"{names[x]} and {names[y]} ran beat together for {overlap:.3f}s: {intervals}"
        report = self.ticks()
        assert report.duplicates == [], f"ticks sent twice: {report.describe()}"

    def describe(self) -> str:
        parts = [self.ticks().describe()]
        for identity, e in self.electors.items():
            events = [(round(ev.at % 100, 3), ev.event) for ev in e.events()][-12:]
            parts.append(f"{identity} (exit={e.proc.poll()}): {events}")
        return "\n".join(parts)

    def close(self) -> None:
        for elector in self.electors.values():
            elector.stop()
        for proxy in self.proxies:
            proxy.stop()
        self.redis.close()


@pytest.fixture
def rig(
    cluster: Cluster, namespace: str, redis_server: RedisServer, redis_db: Any, tmp_path: Path
) -> Iterator[BeatRig]:
    beat_rig = BeatRig(cluster, namespace, redis_server, tmp_path)
    yield beat_rig
    beat_rig.close()


def _standby_of(rig: BeatRig, leader: BeatElector) -> BeatElector:
    return next(e for e in rig.electors.values() if e is not leader and e.proc.poll() is None)


def _wait_observed(elector: BeatElector, holder: str) -> None:
    """The standby has read the lease at least once with `holder` in it."""
    wait_for(
        lambda: any(e.event == "observed-holder" and e.fields.get("holder") == holder for e in elector.events()),
        timeout=15,
        message=f"{elector.identity} to observe {holder}",
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_two_electors_run_exactly_one_beat_that_ticks_once_per_second(rig: BeatRig) -> None:
    rig.start("beat-a")
    rig.start("beat-b")
    leader = rig.leader()
    rig.wait_ticks_from(leader.identity, 6)

    assert rig.lease()["spec"]["holderIdentity"] == leader.identity
    standby = _standby_of(rig, leader)
    assert standby.times("cmd-started") == []
    report = rig.ticks()
    assert report.senders == [leader.identity]
    assert report.duplicates == [] and report.missed == [], report.describe()
    assert report.longest_gap < 1.5, report.describe()


@pytest.mark.parametrize(
    "victims",
    [
        pytest.param("elector-and-beat", id="kill-9-elector-and-beat"),
        pytest.param("elector-only", id="kill-9-elector-beat-dies-with-it"),
    ],
)
def test_killed_leader_is_replaced_within_duration_plus_retry(rig: BeatRig, victims: str) -> None:
    rig.start("beat-a")
    rig.start("beat-b")
    leader = rig.leader()
    standby = _standby_of(rig, leader)
    _wait_observed(standby, leader.identity)
    rig.wait_ticks_from(leader.identity, 3)

    beat_pid = leader.beat_pid()
    assert beat_pid is not None
    if victims == "elector-and-beat":
        killed_at = leader.kill_with_beat()
    else:
        killed_at = time.time()
        leader.proc.kill()
        leader.killed_at = killed_at
        leader.proc.wait(timeout=10)
        # PR_SET_PDEATHSIG: an elector that dies takes its beat with it, so no beat runs unfenced.
        wait_for(lambda: not _alive(beat_pid), timeout=2, message=f"beat {beat_pid} to die with its elector")

    assert rig.leader(timeout=TIMINGS.duration + TIMINGS.retry_period + 10, other_than=leader) is standby
    takeover = standby.times("cmd-started")[0] - killed_at
    assert takeover <= TIMINGS.duration + TIMINGS.retry_period + SLACK, rig.describe()
    rig.wait_ticks_from(standby.identity, 2)
    report = rig.ticks()
    assert report.duplicates == [], report.describe()
    assert len(report.missed) <= TIMINGS.duration + TIMINGS.retry_period + BEAT_STARTUP, report.describe()
    assert rig.lease()["spec"]["leaseTransitions"] == 1


def test_graceful_stop_hands_over_within_about_one_retry_period(rig: BeatRig) -> None:
    rig.start("beat-a")
    rig.start("beat-b")
    leader = rig.leader()
    standby = _standby_of(rig, leader)
    _wait_observed(standby, leader.identity)
    rig.wait_ticks_from(leader.identity, 3)

    leader.sigterm()
    assert leader.proc.wait(timeout=10) == 0
    assert [e.event for e in leader.events()][-3:] == ["cmd-stopping", "cmd-stopped", "released"]
    assert rig.leader(timeout=5, other_than=leader) is standby
    handover = standby.times("cmd-started")[0] - leader.times("cmd-stopped")[-1]
    assert 0 < handover <= TIMINGS.retry_period + SLACK, rig.describe()
    rig.wait_ticks_from(standby.identity, 2)
    rig.assert_never_two_beats()
    report = rig.ticks()
    assert len(report.missed) <= TIMINGS.retry_period + BEAT_STARTUP, report.describe()
    assert rig.lease()["spec"]["leaseTransitions"] == 1


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_partitioned_leader_stops_beat_before_the_standby_starts_it(rig: BeatRig, mode: str) -> None:
    leader = rig.start("beat-a", via_proxy=True)
    assert rig.leader() is leader
    standby = rig.start("beat-b")
    _wait_observed(standby, leader.identity)
    rig.wait_ticks_from(leader.identity, 3)

    cut_at = rig.proxies[0].cut(mode)
    assert rig.leader(timeout=TIMINGS.duration + TIMINGS.retry_period + 10, other_than=leader) is standby
    stopped = leader.times("cmd-stopped")[0]
    started = standby.times("cmd-started")[0]
    assert stopped < started, rig.describe()
    assert stopped - cut_at <= TIMINGS.renew_deadline + SLACK, rig.describe()
    assert started - cut_at <= TIMINGS.duration + TIMINGS.retry_period + SLACK, rig.describe()

    # Healed, the old leader rejoins as a standby and does not start a second beat.
    rig.proxies[0].restore()
    wait_for(
        lambda: leader.times("api-recovered") and leader.times("observed-holder")[-1] > rig.proxies[0].history[-1][0],
        timeout=10,
        message=rig.describe,
    )
    rig.wait_ticks_from(standby.identity, 3)
    assert leader.beat_pid() is None and len(leader.times("cmd-started")) == 1
    rig.assert_never_two_beats()


@pytest.mark.parametrize("new_holder", ["intruder", "standby"])
def test_hand_edited_holder_converges_to_one_leader(rig: BeatRig, new_holder: str) -> None:
    rig.start("beat-a")
    rig.start("beat-b")
    leader = rig.leader()
    standby = _standby_of(rig, leader)
    _wait_observed(standby, leader.identity)
    rig.wait_ticks_from(leader.identity, 2)

    holder = standby.identity if new_holder == "standby" else "intruder"
    patch = json.dumps({"spec": {"holderIdentity": holder}})
    rig.cluster.kubectl("patch", "lease", LEASE, "-n", rig.namespace, "--type=merge", "-p", patch)
    edited_at = time.time()

    # The leader notices at its next renewal and stops at once, not at its renew deadline.
    wait_for(lambda: leader.times("cmd-stopped"), timeout=5, message=rig.describe)
    assert leader.times("cmd-stopped")[-1] - edited_at <= TIMINGS.retry_period + SLACK, rig.describe()
    lost = next(e for e in leader.events() if e.event == "lost")
    assert lost.fields["reason"] == "lease-changed"

    # Nobody renews the edited record; it expires and exactly one of the two takes over.
    new_leader = rig.leader(timeout=TIMINGS.duration + TIMINGS.retry_period + 10)
    assert new_leader.times("cmd-started")[-1] - edited_at >= TIMINGS.duration - SLACK
    wait_for(lambda: rig.lease()["spec"]["holderIdentity"] == new_leader.identity, timeout=5)
    renewed = rig.lease()["spec"]["renewTime"]
    wait_for(lambda: rig.lease()["spec"]["renewTime"] != renewed, timeout=5, message="the new leader to renew")
    rig.wait_ticks_from(new_leader.identity, 2 + (new_leader is leader) * 2)
    assert sum(e.is_leading() for e in rig.electors.values()) == 1
    rig.assert_never_two_beats()
