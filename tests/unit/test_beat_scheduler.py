"""Beat's LeaseScheduler and its store, against an in-memory Lease with the apiserver's
compare-and-swap (the real apiserver: tests/integration/test_beat_state.py)."""

from __future__ import annotations

import copy
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.utils.imports import symbol_by_name

from celery_fleet.beat.scheduler import RETRY_SECONDS, LeaseScheduler
from celery_fleet.elector.cli import command_environment, parse_invocation
from celery_fleet.elector.election import Lease, LeaseApiError, LeaseConflict, UsageError
from celery_fleet.elector.lease_client import ApiEndpoint
from celery_fleet.elector.schedule_state import ANNOTATION, STATE_ENV, EntryState, encode_state, parse_state
from celery_fleet.elector.schedule_store import Deposed, ScheduleStore, StoreConfig
from celery_fleet.planning.beat_workload import DEFAULT_SCHEDULER

T0 = datetime(2026, 12, 8, 1, 0, 0, tzinfo=UTC)


class MemoryLease:
    """One Lease with resourceVersion semantics: a PUT at a stale version is a 409."""

    def __init__(self, holder: str = "pod-a", acquired: str = "t1", annotation: str | None = None) -> None:
        self.version = 1
        self.body: dict[str, Any] = {
            "metadata": {"name": "b", "resourceVersion": "1", "annotations": {}},
            "spec": {"holderIdentity": holder, "acquireTime": acquired, "leaseDurationSeconds": 15},
        }
        if annotation is not None:
            self.body["metadata"]["annotations"][ANNOTATION] = annotation
        self.puts = 0
        self.fail_next = 0  # transport failures to inject
        self.conflict_next = 0  # someone else's write lands between our GET and PUT, this many times

    def bump(self, **spec: Any) -> None:
        self.version += 1
        self.body["metadata"]["resourceVersion"] = str(self.version)
        self.body["spec"].update(spec)

    def get(self, timeout: float) -> Lease | None:
        if self.fail_next:
            self.fail_next -= 1
            raise LeaseApiError("connection refused")
        return Lease.from_body(copy.deepcopy(self.body))

    def replace_annotation(self, lease: Lease, key: str, value: str, timeout: float) -> Lease:
        if self.conflict_next:
            self.conflict_next -= 1
            self.bump()  # an elector renewal
        if lease.resource_version != self.body["metadata"]["resourceVersion"]:
            raise LeaseConflict("stale", 409)
        self.puts += 1
        self.bump()
        self.body["metadata"]["annotations"][key] = value
        return Lease.from_body(copy.deepcopy(self.body))

    def state(self) -> dict[str, EntryState]:
        return parse_state(self.body["metadata"]["annotations"].get(ANNOTATION))[0]


# =========================================================================== the store


def test_load_fixes_the_term_and_reads_the_state() -> None:
    lease = MemoryLease(annotation=encode_state({"a": EntryState(T0, 3)}))
    store = ScheduleStore(lease, "pod-a")
    assert store.load() == ({"a": EntryState(T0, 3)}, None)


def test_load_when_the_lease_names_someone_else_is_deposed() -> None:
    with pytest.raises(Deposed):
        ScheduleStore(MemoryLease(holder="pod-b"), "pod-a").load()


def test_record_merges_into_the_annotation_at_the_version_read() -> None:
    lease = MemoryLease(annotation=encode_state({"other": EntryState(T0, 1)}))
    store = ScheduleStore(lease, "pod-a")
    store.load()
    store.record("a", EntryState(T0 + timedelta(seconds=5), 1))
    assert lease.state() == {"other": EntryState(T0, 1), "a": EntryState(T0 + timedelta(seconds=5), 1)}
    assert lease.body["spec"]["holderIdentity"] == "pod-a"  # the spec went back as it was read


def test_record_retries_after_a_renewal_moved_the_version() -> None:
    lease = MemoryLease()
    store = ScheduleStore(lease, "pod-a")
    store.load()
    lease.conflict_next = 2
    store.record("a", EntryState(T0, 1))
    assert lease.puts == 1 and "a" in lease.state()


def test_record_gives_up_when_the_version_never_holds() -> None:
    lease = MemoryLease()
    store = ScheduleStore(lease, "pod-a")
    store.load()
    lease.conflict_next = 100
    with pytest.raises(LeaseApiError):
        store.record("a", EntryState(T0, 1))
    assert lease.puts == 0


@pytest.mark.parametrize(
    "takeover", [{"holderIdentity": "pod-b", "acquireTime": "t2"}, {"holderIdentity": "pod-a", "acquireTime": "t9"}]
)
def test_a_deposed_leader_records_nothing(takeover: dict[str, str]) -> None:
    lease = MemoryLease()
    store = ScheduleStore(lease, "pod-a")
    store.load()
    lease.bump(**takeover)
    with pytest.raises(Deposed):
        store.record("a", EntryState(T0, 1))
    assert lease.puts == 0 and lease.state() == {}


def test_an_unchanged_record_is_not_written() -> None:
    lease = MemoryLease(annotation=encode_state({"a": EntryState(T0, 1)}))
    store = ScheduleStore(lease, "pod-a")
    store.load()
    store.record("a", EntryState(T0, 1))
    assert lease.puts == 0


def test_oversize_state_is_ignored_on_load_and_replaced_on_record() -> None:
    lease = MemoryLease(annotation="x" * (1 << 20))
    store = ScheduleStore(lease, "pod-a")
    entries, problem = store.load()
    assert entries == {} and problem is not None
    store.record("a", EntryState(T0, 1))
    assert lease.state() == {"a": EntryState(T0, 1)}


# =========================================================================== handing it to beat


def test_config_round_trips_through_the_environment_with_paths_only() -> None:
    endpoint = ApiEndpoint(server="https://10.0.0.1:443", ca_file="/sa/ca.crt", token_file="/sa/token")
    config = StoreConfig.for_endpoint(endpoint, "jobs", "nightly-beat", "pod-a")
    assert StoreConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize("raw", ["x" * 9000, "[]", "{", json.dumps({"namespace": "jobs"})])
def test_config_from_the_environment_is_checked(raw: str) -> None:
    with pytest.raises(UsageError):
        StoreConfig.from_env(raw)


def test_an_in_memory_token_is_never_handed_over() -> None:
    endpoint = ApiEndpoint(server="https://h", token_source=lambda: "secret-token")
    with pytest.raises(UsageError, match="credentials in files"):
        StoreConfig.for_endpoint(endpoint, "jobs", "b", "pod-a")


def test_schedule_state_puts_the_bundle_after_the_users_path() -> None:
    argv = ["--server", "https://h", "--token-file", "/sa/token", "--namespace", "jobs", "--lease", "b"]
    argv += ["--identity", "pod-a", "--schedule-state", "--", sys.executable, "-c", "pass"]
    invocation = parse_invocation(argv, {})
    env = command_environment(invocation, {"PYTHONPATH": "/app", "HOME": "/home/x"})
    assert env is not None and env["HOME"] == "/home/x"
    first, *rest = env["PYTHONPATH"].split(":")
    assert first == "/app" and len(rest) == 1
    assert json.loads(env[STATE_ENV])["token_file"] == "/sa/token"
    plain = parse_invocation([a for a in argv if a != "--schedule-state"], {})
    assert command_environment(plain, {}) is None


# =========================================================================== the scheduler


def _app(entries: dict[str, Any]) -> Celery:
    app = Celery("t", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = entries
    app.conf.result_expires = None  # no default cleanup entry
    return app


def _scheduler(app: Celery, lease: MemoryLease) -> LeaseScheduler:
    return LeaseScheduler(app=app, store=ScheduleStore(lease, "pod-a"))


def test_the_default_scheduler_name_resolves_to_the_lease_scheduler() -> None:
    assert symbol_by_name(DEFAULT_SCHEDULER) is LeaseScheduler


def test_a_new_leader_starts_from_the_stored_last_run() -> None:
    last = datetime.now(UTC) - timedelta(seconds=4)
    lease = MemoryLease(annotation=encode_state({"ten-s": EntryState(last, 7)}))
    app = _app({"ten-s": {"task": "t.x", "schedule": 10.0}})
    entry = _scheduler(app, lease).schedule["ten-s"]
    assert entry.last_run_at == last and entry.total_run_count == 7
    due, next_in = entry.is_due()
    assert not due and 5.0 < next_in <= 6.0  # the countdown goes on: not restarted at 10 s


def test_an_overdue_entry_is_sent_once_and_recorded_before_it_is_sent() -> None:
    last = datetime.now(UTC) - timedelta(seconds=35)  # three runs of a 10 s interval fell in the gap
    lease = MemoryLease(annotation=encode_state({"ten-s": EntryState(last, 7)}))
    scheduler = _scheduler(_app({"ten-s": {"task": "t.x", "schedule": 10.0}}), lease)
    entry = scheduler.schedule["ten-s"]
    due, _ = scheduler.is_due(entry)
    assert due
    recorded = lease.state()["ten-s"]  # on the Lease before reserve/apply_entry run
    assert recorded.total_run_count == 8 and recorded.last_run_at > last
    new_entry = scheduler.reserve(entry)
    assert new_entry.last_run_at == recorded.last_run_at and new_entry.total_run_count == 8
    assert not scheduler.is_due(new_entry)[0]  # caught up once, not once per missed run
    assert lease.puts == 1


def test_a_failed_record_is_not_sent_and_is_retried_soon() -> None:
    lease = MemoryLease(annotation=encode_state({"ten-s": EntryState(datetime.now(UTC) - timedelta(minutes=1), 1)}))
    scheduler = _scheduler(_app({"ten-s": {"task": "t.x", "schedule": 10.0}}), lease)
    lease.fail_next = 1
    assert tuple(scheduler.is_due(scheduler.schedule["ten-s"])) == (False, RETRY_SECONDS)
    assert scheduler.is_due(scheduler.schedule["ten-s"])[0]


def test_a_deposed_scheduler_never_sends_again() -> None:
    lease = MemoryLease(annotation=encode_state({"ten-s": EntryState(datetime.now(UTC) - timedelta(minutes=1), 1)}))
    scheduler = _scheduler(_app({"ten-s": {"task": "t.x", "schedule": 10.0}}), lease)
    lease.bump(holderIdentity="pod-b", acquireTime="t2")
    assert not scheduler.is_due(scheduler.schedule["ten-s"])[0]
    lease.bump(holderIdentity="pod-a", acquireTime="t1")  # even if the record looked like ours again
    assert not scheduler.is_due(scheduler.schedule["ten-s"])[0]
    assert lease.puts == 0


def test_a_scheduler_started_without_the_lease_sends_nothing() -> None:
    scheduler = _scheduler(_app({"ten-s": {"task": "t.x", "schedule": 0.001}}), MemoryLease(holder="pod-b"))
    assert not scheduler.is_due(scheduler.schedule["ten-s"])[0]


def test_without_the_elector_the_scheduler_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_ENV, raising=False)
    with pytest.raises(UsageError, match="--schedule-state"):
        LeaseScheduler(app=_app({}))


def test_an_entry_that_never_ran_is_recorded_from_its_first_start() -> None:
    # The first leader dies before the entry's first slot: the next one must count from the same origin.
    lease = MemoryLease()
    before = datetime.now(UTC)
    first = _scheduler(_app({"every-minute": {"task": "t.x", "schedule": 60.0}}), lease)
    origin = lease.state()["every-minute"]
    assert origin.total_run_count == 0 and origin.last_run_at >= before - timedelta(seconds=1)
    second = _scheduler(_app({"every-minute": {"task": "t.x", "schedule": 60.0}}), lease)
    assert second.schedule["every-minute"].last_run_at == first.schedule["every-minute"].last_run_at
    assert lease.puts == 1  # the second start found it there
