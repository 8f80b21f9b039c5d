"""Issue 29: beat's shared schedule state on the Lease, against the real apiserver and real beats.

- The fence: a deposed leader's record is refused, both by the apiserver (a PUT at the
  resourceVersion it read before the takeover is a 409) and by the store (the re-read shows
  another term), and the elector's own renewals keep the state.
- A failover with real `celery beat` (LeaseScheduler, tests/support/beat_slots_app.py): the new
  leader starts from the old one's last runs; the slot inside the gap is sent once; nothing twice.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.elector.election import LeaseConflict, LeaseRecord
from celery_fleet.elector.lease_client import HttpLeaseApi
from celery_fleet.elector.schedule_state import ANNOTATION, EntryState, parse_state
from celery_fleet.elector.schedule_store import Deposed, ScheduleStore
from celery_fleet.leader import endpoint_from_kubeconfig
from tests.support.beat_slots_app import ALIGNED_TASK, INTERVAL_TASK, read_sends
from tests.support.beat_state_rig import ROOT, start_app_elector, start_slots_elector
from tests.support.beatapp import BeatElector, Timings
from tests.support.cluster import Cluster
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LEASE = "beat"
DJBEAT_QUEUE = "djbeat"
T0 = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)


def _api(cluster: Cluster, namespace: str) -> HttpLeaseApi:
    endpoint, _ = endpoint_from_kubeconfig(str(cluster.kubeconfig), None)
    return HttpLeaseApi(endpoint, namespace, LEASE)


def _stored(cluster: Cluster, namespace: str) -> dict[str, EntryState]:
    body = json.loads(cluster.kubectl("get", "lease", LEASE, "-n", namespace, "-o", "json").stdout)
    return parse_state((body["metadata"].get("annotations") or {}).get(ANNOTATION))[0]


def test_a_deposed_leaders_record_is_refused(cluster: Cluster, namespace: str) -> None:
    elector_a = _api(cluster, namespace)  # the electors' view of the Lease
    lease = elector_a.create(LeaseRecord("pod-a", 15, "2026-12-08T01:00:00.000000Z", "2026-12-08T01:00:00.000000Z"), 5)
    store_a = ScheduleStore(_api(cluster, namespace), "pod-a")
    assert store_a.load() == ({}, None)
    store_a.record("every-minute", EntryState(T0, 1))
    assert _stored(cluster, namespace) == {"every-minute": EntryState(T0, 1)}

    # A renewal by the elector (its cached Lease is stale after the record: 409, re-read, write)
    # keeps the state, and the next record goes through the renewed version.
    with pytest.raises(LeaseConflict):
        elector_a.replace(lease, LeaseRecord("pod-a", 15, lease.record.acquire_time, "2026-12-08T01:00:02.000000Z"), 5)
    fresh = elector_a.get(5)
    assert fresh is not None
    elector_a.replace(fresh, LeaseRecord("pod-a", 15, fresh.record.acquire_time, "2026-12-08T01:00:02.000000Z"), 5)
    store_a.record("every-minute", EntryState(T0 + timedelta(minutes=1), 2))
    assert _stored(cluster, namespace)["every-minute"] == EntryState(T0 + timedelta(minutes=1), 2)

    # pod-a's beat reads the Lease to record a run ... and pod-b takes over before it writes.
    read_by_a = elector_a.get(5)
    assert read_by_a is not None
    elector_b = _api(cluster, namespace)
    seen_by_b = elector_b.get(5)
    assert seen_by_b is not None
    stamp = "2026-12-08T01:00:20.000000Z"
    elector_b.replace(seen_by_b, LeaseRecord("pod-b", 15, stamp, stamp, seen_by_b.record.transitions + 1), 5)

    # The apiserver refuses the write at the version read before the takeover ...
    with pytest.raises(LeaseConflict) as refused:
        store_a.api.replace_annotation(read_by_a, ANNOTATION, '{"v":1,"entries":{}}', 5)
    assert refused.value.status == 409
    # ... and the store, re-reading, sees another term and gives up for good.
    with pytest.raises(Deposed, match="pod-b"):
        store_a.record("every-minute", EntryState(T0 + timedelta(minutes=2), 3))
    assert _stored(cluster, namespace)["every-minute"] == EntryState(T0 + timedelta(minutes=1), 2)

    # The new term starts from what the old one recorded, and records through its own fence.
    store_b = ScheduleStore(_api(cluster, namespace), "pod-b")
    assert store_b.load()[0] == {"every-minute": EntryState(T0 + timedelta(minutes=1), 2)}
    store_b.record("every-minute", EntryState(T0 + timedelta(minutes=2), 3))
    assert _stored(cluster, namespace)["every-minute"] == EntryState(T0 + timedelta(minutes=2), 3)


# =========================================================================== real beats, one failover

TIMINGS = Timings(duration=4, renew_deadline=3, retry_period=0.5)
ALIGNED_SECONDS = 6.0
INTERVAL_SECONDS = 3.0


@pytest.fixture
def electors(tmp_path: Path) -> Iterator[dict[str, BeatElector]]:
    started: dict[str, BeatElector] = {}
    yield started
    for elector in started.values():
        elector.stop()


def test_a_failover_keeps_last_runs_and_sends_the_gap_slot_once(
    cluster: Cluster,
    namespace: str,
    redis_server: RedisServer,
    redis_db: Any,
    tmp_path: Path,
    electors: dict[str, BeatElector],
) -> None:
    redis = redis_server.client()
    env = {"SLOTS_ALIGNED_SECONDS": f"{ALIGNED_SECONDS:g}", "SLOTS_INTERVAL_SECONDS": f"{INTERVAL_SECONDS:g}"}
    for identity in ("beat-a", "beat-b"):
        electors[identity] = start_slots_elector(
            identity,
            workdir=tmp_path,
            kubeconfig=cluster.kubeconfig,
            namespace=namespace,
            lease=LEASE,
            broker_url=redis_server.url,
            timings=TIMINGS,
            extra_env=env,
        )

    def describe() -> str:
        lines = [json.dumps(s) for s in read_sends(redis)]
        for e in electors.values():
            lines.append(f"{e.identity}: {[(round(ev.at % 100, 2), ev.event) for ev in e.events()][-10:]}")
            lines += e.log_path.read_text(errors="replace").splitlines()[-15:]
        return "\n".join(lines)

    def leading() -> BeatElector | None:
        now_leading = [e for e in electors.values() if e.is_leading()]
        assert len(now_leading) <= 1, "two beats at once"
        return now_leading[0] if now_leading else None

    old = wait_for(leading, timeout=30, message=describe)
    # One aligned slot and two interval runs from the first leader, so both have a last run.
    wait_for(
        lambda: (
            sum(s["task"] == ALIGNED_TASK and s["sender"] == old.identity for s in read_sends(redis)) >= 1
            and sum(s["task"] == INTERVAL_TASK and s["sender"] == old.identity for s in read_sends(redis)) >= 2
        ),
        timeout=40,
        message=describe,
    )
    # Kill it just before a slot boundary: that slot then falls inside the failover gap (>= 3.5 s).
    wait_for(lambda: 1.0 <= ALIGNED_SECONDS - time.time() % ALIGNED_SECONDS <= 1.5, timeout=10, interval=0.05)
    old.kill_with_beat()
    new = next(e for e in electors.values() if e is not old)
    wait_for(lambda: new.is_leading(), timeout=30, message=describe)
    wait_for(
        lambda: {s["task"] for s in read_sends(redis) if s["sender"] == new.identity} == {ALIGNED_TASK, INTERVAL_TASK},
        timeout=30,
        message=describe,
    )

    sends = read_sends(redis)
    started = new.times("cmd-started")[-1]
    for task in (ALIGNED_TASK, INTERVAL_TASK):
        mine = [s for s in sends if s["task"] == task]
        last_old = [s for s in mine if s["sender"] == old.identity][-1]
        first_new = next(s for s in mine if s["sender"] == new.identity)
        # The new leader judged its first run against the old leader's last one, as recorded on
        # the Lease (to the ms), not against its own start: neither restarted nor forgotten.
        assert abs(first_new["last_run_at"] - last_old["published_at"]) < 0.5, describe()
        assert first_new["last_run_at"] < started, describe()
    aligned = [s for s in sends if s["task"] == ALIGNED_TASK]
    slots = [s["slot"] for s in aligned]
    assert len(slots) == len(set(slots)), f"an aligned slot sent twice: {describe()}"
    last_old_slot = max(s["slot"] for s in aligned if s["sender"] == old.identity)
    first_new = next(s for s in aligned if s["sender"] == new.identity)
    gap_slot = last_old_slot + ALIGNED_SECONDS
    # The slot that fell in the gap is covered by exactly one send: the new leader's catch-up.
    assert first_new["slot"] >= gap_slot and first_new["published_at"] >= gap_slot, describe()
    assert math.floor(first_new["published_at"] / ALIGNED_SECONDS) * ALIGNED_SECONDS == first_new["slot"]
    intervals = [s["published_at"] for s in sends if s["task"] == INTERVAL_TASK]
    closest = min(b - a for a, b in itertools.pairwise(intervals))
    assert closest > INTERVAL_SECONDS / 2, f"an interval run sent twice: {describe()}"
    stored = _stored(cluster, namespace)
    assert set(stored) == {"aligned", "interval"}
    redis.close()


# =========================================================================== django-celery-beat (SQLite)


def test_django_celery_beat_under_the_elector_keeps_its_state_in_the_database(
    cluster: Cluster,
    namespace: str,
    redis_server: RedisServer,
    redis_db: Any,
    tmp_path: Path,
    electors: dict[str, BeatElector],
) -> None:
    """The documented combination (docs/beat.md): one DatabaseScheduler at a time, and its run count,
    synced after each send (beat_sync_every = 1), carries on through a kill -9 of the leader."""
    database = tmp_path / "beat.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DJBEAT_DB": str(database)}

    def djbeat(command: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.djbeat_app", command], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    djbeat("setup")  # an interval task every 3 s
    redis = redis_server.client()
    for identity in ("beat-a", "beat-b"):
        electors[identity] = start_app_elector(
            identity,
            workdir=tmp_path,
            kubeconfig=cluster.kubeconfig,
            namespace=namespace,
            lease=LEASE,
            timings=TIMINGS,
            app="tests.support.djbeat_app",
            scheduler="django_celery_beat.schedulers:DatabaseScheduler",
            env={"DJBEAT_DB": str(database), "DJBEAT_BROKER_URL": redis_server.url, "DJBEAT_SENDER": identity},
        )

    def sends() -> list[tuple[str, float]]:
        out = [json.loads(raw)["headers"] for raw in redis.lrange(DJBEAT_QUEUE, 0, -1)]
        return sorted(((h["sender"], float(h["published_at"])) for h in out), key=lambda s: s[1])

    def describe() -> str:
        lines = [str(sends())]
        for e in electors.values():
            lines += e.log_path.read_text(errors="replace").splitlines()[-12:]
        return "\n".join(lines)

    def leading() -> BeatElector | None:
        now_leading = [e for e in electors.values() if e.is_leading()]
        assert len(now_leading) <= 1, "two beats at once"
        return now_leading[0] if now_leading else None

    old = wait_for(leading, timeout=30, message=describe)
    wait_for(lambda: sum(s[0] == old.identity for s in sends()) >= 2, timeout=40, message=describe)
    old.kill_with_beat()
    new = next(e for e in electors.values() if e is not old)
    wait_for(lambda: sum(s[0] == new.identity for s in sends()) >= 2, timeout=40, message=describe)

    sent = sends()
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(sent)]
    assert min(gaps) > 1.5, f"a run sent twice: {describe()}"
    # The count the new leader synced includes the old leader's runs: the state is the database's.
    # (At most the run in flight at the kill is missing from it.)
    count = int(djbeat("count"))
    from_old = sum(s[0] == old.identity for s in sent)
    assert count > from_old and count >= len(sent) - 1, f"total_run_count {count}: {describe()}"
    redis.close()


# =========================================================================== redbeat, its lock off


def test_redbeat_with_its_lock_off_fails_over_with_the_lease(
    cluster: Cluster,
    namespace: str,
    redis_server: RedisServer,
    redis_db: Any,
    tmp_path: Path,
    electors: dict[str, BeatElector],
) -> None:
    """redbeat_lock_key = None (docs/beat.md): the new leader does not wait for redbeat's lock
    (25 minutes by default), sends nothing twice, and its run count goes on from Redis."""
    redis = redis_server.client()
    for identity in ("beat-a", "beat-b"):
        electors[identity] = start_app_elector(
            identity,
            workdir=tmp_path,
            kubeconfig=cluster.kubeconfig,
            namespace=namespace,
            lease=LEASE,
            timings=TIMINGS,
            app="tests.support.redbeat_app",
            scheduler="redbeat.RedBeatScheduler",
            env={"REDBEAT_BROKER_URL": redis_server.url, "REDBEAT_SENDER": identity},
        )

    def sends() -> list[tuple[str, float]]:
        out = [json.loads(raw)["headers"] for raw in redis.lrange("redbeat", 0, -1)]
        return sorted(((h["sender"], float(h["published_at"])) for h in out), key=lambda s: s[1])

    def describe() -> str:
        lines = [str(sends())]
        for e in electors.values():
            lines += e.log_path.read_text(errors="replace").splitlines()[-12:]
        return "\n".join(lines)

    def leading() -> BeatElector | None:
        now_leading = [e for e in electors.values() if e.is_leading()]
        assert len(now_leading) <= 1, "two beats at once"
        return now_leading[0] if now_leading else None

    old = wait_for(leading, timeout=30, message=describe)
    wait_for(lambda: sum(s[0] == old.identity for s in sends()) >= 2, timeout=40, message=describe)
    old.kill_with_beat()
    new = next(e for e in electors.values() if e is not old)
    # Well inside redbeat's default lock timeout (25 minutes): its lock is not in the way.
    wait_for(lambda: sum(s[0] == new.identity for s in sends()) >= 2, timeout=40, message=describe)

    sent = sends()
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(sent)]
    assert min(gaps) > 1.5, f"a run sent twice: {describe()}"
    meta = json.loads(redis.hget("redbeat:every-few-seconds", "meta") or "{}")
    from_old = sum(s[0] == old.identity for s in sent)
    assert meta.get("total_run_count", 0) > from_old, f"redbeat meta {meta}: {describe()}"
    assert not redis.exists("redbeat::lock"), "redbeat took its own lock"
    redis.close()
