"""The shared beat schedule state: format, bounds, merge, restore and the fence decision. (pure)"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from celery_fleet import GROUP
from celery_fleet.elector.schedule_state import (
    ANNOTATION,
    MAX_ENTRIES,
    MAX_NAME_CHARS,
    MAX_STATE_BYTES,
    EntryState,
    Term,
    encode_state,
    may_write,
    parse_state,
    record_run,
    restore,
    term_at_start,
)

T0 = datetime(2026, 12, 8, 1, 0, 0, 12345, tzinfo=UTC)


def test_annotation_is_in_the_operators_group() -> None:
    assert ANNOTATION.startswith(f"{GROUP}/")


def test_round_trip_keeps_time_and_count() -> None:
    state = {"every-minute": EntryState(T0, 3), "ten-s": EntryState(T0 + timedelta(seconds=7), 0)}
    assert parse_state(encode_state(state)) == (state, None)


def test_encoding_is_utc_and_stable() -> None:
    paris = timezone(timedelta(hours=1))
    a = encode_state({"x": EntryState(T0.astimezone(paris), 1), "a": EntryState(T0, 2)})
    b = encode_state({"a": EntryState(T0, 2), "x": EntryState(T0, 1)})
    assert a == b and "+00:00" in a


@pytest.mark.parametrize("raw", [None, ""])
def test_absent_state_is_empty_and_not_a_problem(raw: str | None) -> None:
    assert parse_state(raw) == ({}, None)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("{not json", "not JSON"),
        ("[]", "not version"),
        (json.dumps({"v": 2, "entries": {}}), "not version"),
        (json.dumps({"v": 1, "entries": []}), "no entries map"),
    ],
)
def test_unreadable_state_is_ignored_with_a_reason(raw: str, problem: str) -> None:
    entries, why = parse_state(raw)
    assert entries == {} and why is not None and problem in why


def test_oversize_state_is_refused_before_parsing() -> None:
    raw = json.dumps({"v": 1, "entries": {}, "pad": "x" * MAX_STATE_BYTES})
    entries, why = parse_state(raw)
    assert entries == {} and why is not None and "larger than" in why


def test_multibyte_state_is_measured_in_bytes() -> None:
    raw = json.dumps({"v": 1, "entries": {}, "pad": "é" * (MAX_STATE_BYTES // 2 + 1)}, ensure_ascii=False)
    assert len(raw) < MAX_STATE_BYTES
    assert parse_state(raw)[0] == {} and "larger than" in (parse_state(raw)[1] or "")


def test_malformed_entries_are_dropped_one_by_one() -> None:
    good = {"at": T0.isoformat(), "n": 1}
    raw = json.dumps(
        {
            "v": 1,
            "entries": {
                "good": good,
                "naive-time": {"at": "2026-12-08T01:00:00", "n": 1},
                "bad-time": {"at": "yesterday", "n": 1},
                "bool-count": {"at": T0.isoformat(), "n": True},
                "negative": {"at": T0.isoformat(), "n": -1},
                "not-a-map": 5,
                "x" * (MAX_NAME_CHARS + 1): good,
            },
        }
    )
    entries, why = parse_state(raw)
    assert entries == {"good": EntryState(T0, 1)}
    assert why == "6 malformed schedule state entries ignored"


def test_entries_beyond_the_cap_are_not_read() -> None:
    raw = encode_state({f"e{i:04d}": EntryState(T0, i) for i in range(MAX_ENTRIES + 3)})
    entries, why = parse_state(raw)
    assert len(entries) == MAX_ENTRIES and why is not None


def test_record_moves_forward_only() -> None:
    stored = {"a": EntryState(T0 + timedelta(seconds=10), 5)}
    assert record_run(stored, "a", EntryState(T0, 6))["a"] == EntryState(T0 + timedelta(seconds=10), 5)
    later = EntryState(T0 + timedelta(seconds=20), 6)
    assert record_run(stored, "a", later)["a"] == later


def test_record_keeps_other_entries_and_drops_removed_ones() -> None:
    stored = {"a": EntryState(T0, 1), "gone": EntryState(T0, 1)}
    merged = record_run(stored, "b", EntryState(T0, 1), keep={"a", "b"})
    assert merged == {"a": EntryState(T0, 1), "b": EntryState(T0, 1)}
    assert record_run(stored, "b", EntryState(T0, 1))["gone"] == EntryState(T0, 1)  # keep=None: all


def test_record_of_a_long_name_leaves_the_state_alone() -> None:
    stored = {"a": EntryState(T0, 1)}
    assert record_run(stored, "x" * (MAX_NAME_CHARS + 1), EntryState(T0, 1)) == stored


def test_record_beyond_the_cap_drops_the_oldest_others() -> None:
    stored = {f"e{i:04d}": EntryState(T0 + timedelta(seconds=i), 0) for i in range(MAX_ENTRIES)}
    merged = record_run(stored, "new", EntryState(T0 - timedelta(days=1), 0))
    assert len(merged) == MAX_ENTRIES and "new" in merged and "e0000" not in merged
    assert len(encode_state(merged).encode()) < MAX_STATE_BYTES  # the bound holds by construction


def test_restore_takes_only_entries_in_the_schedule_and_clamps_the_future() -> None:
    now = T0 + timedelta(minutes=5)
    stored = {"a": EntryState(T0, 4), "future": EntryState(now + timedelta(seconds=30), 2), "old": EntryState(T0, 1)}
    assert restore(stored, ["a", "future", "new"], now) == {"a": EntryState(T0, 4), "future": EntryState(now, 2)}


def test_term_starts_only_when_the_lease_names_us() -> None:
    assert term_at_start("pod-a", "pod-a", "t1") == Term("pod-a", "t1")
    assert term_at_start("pod-a", "pod-b", "t1") is None
    assert term_at_start("", "", None) is None


@pytest.mark.parametrize(
    ("holder", "acquired", "allowed"),
    [
        ("pod-a", "t1", True),  # our term, renewed any number of times
        ("pod-b", "t2", False),  # someone else took over
        ("", "t3", False),  # released (or cleared by hand)
        ("pod-a", "t4", False),  # us again, but a later term: this process is a deposed leader's
    ],
)
def test_fence_admits_only_our_own_term(holder: str, acquired: str, allowed: bool) -> None:
    assert may_write(Term("pod-a", "t1"), holder, acquired) is allowed
