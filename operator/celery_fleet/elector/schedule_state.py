"""Beat's shared schedule state on the Lease: its format, merge and fence decision. (pure)

Each entry's last run lives in one annotation of the beat's Lease (docs/beat.md). This module
parses and encodes that annotation, merges a run into it and decides whether a write may go
ahead; `schedule_store` does the requests. Standard library only, Python 3.8+: it ships in the
elector's single file and runs inside the user's `celery beat`.

The annotation is input from the apiserver that anyone allowed to edit the Lease can write:
it is bounded in bytes before it is parsed, and malformed entries are dropped one by one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

# What the elector (--schedule-state) hands beat: JSON naming the Lease and the *paths* of the
# credential files, never a token or key (the environment of a process is easy to read).
STATE_ENV = "CELERY_FLEET_BEAT_STATE"
# The group's name (celery_fleet.GROUP), spelled out: the elector imports nothing of the operator.
ANNOTATION = "celeryfleet.io/beat-schedule"
STATE_VERSION = 1
# A few hundred entries of ~100 bytes; Kubernetes allows 256 KiB for all annotations together.
MAX_STATE_BYTES = 64 * 1024
MAX_ENTRIES = 256
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class EntryState:
    """What survives a failover of one schedule entry."""

    last_run_at: datetime  # timezone-aware
    total_run_count: int = 0


@dataclass(frozen=True)
class Term:
    """One leadership: the Lease record a beat process was started under."""

    identity: str
    acquire_time: str | None


def shareable(name: str) -> bool:
    """Only names this short go on the Lease: the annotation's size is bounded by construction."""
    return 0 < len(name) <= MAX_NAME_CHARS


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def parse_state(raw: str | None) -> tuple[dict[str, EntryState], str | None]:
    """The entries in an annotation value, and why any of it was ignored (None: all of it read)."""
    if not raw:
        return {}, None
    # Characters never outnumber UTF-8 bytes: the cheap test first, the exact one before parsing.
    if len(raw) > MAX_STATE_BYTES or len(raw.encode("utf-8", "replace")) > MAX_STATE_BYTES:
        return {}, f"schedule state larger than {MAX_STATE_BYTES} bytes: ignored"
    try:
        document = json.loads(raw)
    except ValueError:
        return {}, "schedule state is not JSON: ignored"
    if not isinstance(document, dict) or document.get("v") != STATE_VERSION:
        return {}, f"schedule state is not version {STATE_VERSION}: ignored"
    raw_entries = document.get("entries")
    if not isinstance(raw_entries, dict):
        return {}, "schedule state has no entries map: ignored"
    entries: dict[str, EntryState] = {}
    dropped = 0
    for name, value in raw_entries.items():
        if len(entries) >= MAX_ENTRIES or not shareable(name) or not isinstance(value, dict):
            dropped += 1
            continue
        at = _parse_time(value.get("at"))
        count = value.get("n", 0)
        if at is None or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            dropped += 1
            continue
        entries[name] = EntryState(at, count)
    return entries, (f"{dropped} malformed schedule state entries ignored" if dropped else None)


def encode_state(entries: Mapping[str, EntryState]) -> str:
    """The annotation value; stable (sorted, compact) so equal states encode to equal bytes."""
    body = {
        name: {"at": entry.last_run_at.astimezone(timezone.utc).isoformat(), "n": entry.total_run_count}  # noqa: UP017 (3.8)
        for name, entry in entries.items()
    }
    return json.dumps({"v": STATE_VERSION, "entries": body}, sort_keys=True, separators=(",", ":"))


def record_run(
    stored: Mapping[str, EntryState], name: str, run: EntryState, keep: Collection[str] | None = None
) -> dict[str, EntryState]:
    """The state after recording `run` of `name` into the freshly read `stored` state.

    Entries not in `keep` (the current schedule's names; None keeps all) are dropped. A last run
    only moves forward: a stored later run is kept. Beyond MAX_ENTRIES the oldest others go.
    """
    merged = {k: v for k, v in stored.items() if keep is None or k in keep}
    if shareable(name):
        prior = merged.get(name)
        if prior is None or run.last_run_at >= prior.last_run_at:
            merged[name] = run
    if len(merged) > MAX_ENTRIES:
        others = sorted((k for k in merged if k != name), key=lambda k: (merged[k].last_run_at, k))
        for k in others[: len(merged) - MAX_ENTRIES]:
            del merged[k]
    return merged


def restore(stored: Mapping[str, EntryState], names: Collection[str], now: datetime) -> dict[str, EntryState]:
    """The stored runs of the entries in the schedule (`names`), for a new leader to start from.

    A last run in the future (another node's clock ahead of ours) is taken as now: the entry is
    then not due before its next run after now, which never sends a slot twice.
    """
    restored = {}
    for name in names:
        entry = stored.get(name)
        if entry is None:
            continue
        if entry.last_run_at > now:
            entry = EntryState(now, entry.total_run_count)
        restored[name] = entry
    return restored


def term_at_start(identity: str, holder: str, acquire_time: str | None) -> Term | None:
    """The term a beat process starts in, or None when the Lease does not name us (already deposed)."""
    if not identity or holder != identity:
        return None
    return Term(identity, acquire_time)


def may_write(term: Term, holder: str, acquire_time: str | None) -> bool:
    """The fence: a record may be written only while the Lease still shows our term.

    The PUT that follows is a compare-and-swap on the resourceVersion this record was read at, so a
    term that begins after this read makes the PUT fail (409) and the re-read lands here again.
    """
    return holder == term.identity and acquire_time == term.acquire_time
