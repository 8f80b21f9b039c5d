"""The election itself: lease records and the state machine that decides who leads. (pure)

No I/O and no clock of its own: times are passed in. Monotonic seconds (`now`) judge expiry and
deadlines; wall-clock stamps (`wall`) are only written into records, never trusted.

Semantics follow client-go's leaderelection:
- a lease is free when nobody holds it, or when its record has not changed for its
  leaseDurationSeconds as measured by *our own* monotonic clock from when we first saw that
  record (robust to clock skew between nodes);
- every write is a compare-and-swap on resourceVersion (409 -> re-read);
- leaseTransitions counts holder changes;
- a leader's renew deadline (< duration) counts from when it *sent* its last successful write,
  so it has stopped its command before any standby sees the lease expire.

Stricter than client-go, because a second beat sends every periodic task twice:
- a leader that sees the record written by someone else has lost at once;
- a record naming us that we did not write in this process (a hand edit, or a previous
  incarnation of this pod) is treated as held until it expires;
- an empty holder is free at once only when written as a release (duration 1 s) or never held;
  a holder cleared by hand waits out the record's duration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

# Annotations are never evaluated (PEP 563), so the modern spellings stay valid on Python 3.8, which
# a user's Celery image may still run; nothing here subscripts a generic at runtime.

# Written into the record on release; an empty holder with this duration is free at once.
RELEASED_DURATION_SECONDS = 1


class UsageError(ValueError):
    """A bad flag or environment value; the message names it and says how to fix it."""


class LeaseApiError(Exception):
    """The apiserver could not be reached or refused a lease request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LeaseConflict(LeaseApiError):
    """Our view of the lease is stale (409, or it was deleted): re-read before writing."""


def format_micro_time(moment: datetime) -> str:
    """The apiserver's MicroTime wire form, so a record round-trips byte for byte."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: UP017 (3.8 has no datetime.UTC)


@dataclass(frozen=True)
class LeaseRecord:
    """The part of a Lease's spec that election reads and writes."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> LeaseRecord:
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time is not None:
            spec["renewTime"] = self.renew_time
        return spec


@dataclass(frozen=True)
class Lease:
    """A Lease as read from the apiserver: the record plus what a compare-and-swap needs."""

    record: LeaseRecord
    resource_version: str
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Lease:
        metadata = body.get("metadata") or {}
        return cls(
            record=LeaseRecord.from_spec(body.get("spec") or {}),
            resource_version=str(metadata.get("resourceVersion") or ""),
            body=body,
        )


class LeaseApi(Protocol):
    """The three Lease requests. `timeout` is a wall-clock budget for the whole request (connect,
    TLS, send, every byte of the reply): a trickling apiserver cannot stretch it."""

    def get(self, timeout: float) -> Lease | None:
        """The lease, or None when it does not exist."""

    def create(self, record: LeaseRecord, timeout: float) -> Lease:
        """Raises LeaseConflict when it already exists."""

    def replace(self, lease: Lease, record: LeaseRecord, timeout: float) -> Lease:
        """Compare-and-swap on lease.resource_version; raises LeaseConflict when stale."""


@dataclass(frozen=True)
class ElectionTimings:
    duration: int
    renew_deadline: float
    retry_period: float
    stop_grace: float

    def validate(self) -> None:
        if self.duration < 1:
            raise UsageError(f"--duration ({self.duration}) must be a whole number of seconds >= 1")
        if not 0 < self.renew_deadline < self.duration:
            raise UsageError(
                f"--renew-deadline ({self.renew_deadline:g}) must be > 0 and shorter than --duration "
                f"({self.duration}): the old leader must stop before a standby may take over; "
                "lower --renew-deadline or raise --duration"
            )
        if not 0 < self.retry_period < self.renew_deadline:
            raise UsageError(
                f"--retry-period ({self.retry_period:g}) must be > 0 and shorter than --renew-deadline "
                f"({self.renew_deadline:g}) so a failed renewal is retried before the deadline"
            )
        if self.stop_grace < 0 or self.renew_deadline + self.stop_grace >= self.duration:
            raise UsageError(
                f"--stop-grace ({self.stop_grace:g}) must be >= 0 and --renew-deadline + --stop-grace "
                f"({self.renew_deadline + self.stop_grace:g}) must stay below --duration ({self.duration}), "
                "or the command could outlive the lease; lower --stop-grace"
            )


class Election:
    """What we know about the lease and whether we lead; decides, never does I/O.

    Times are monotonic seconds (`now`) except record timestamps, which are wall
    clock strings passed in (`wall`) and only written, never trusted.
    """

    def __init__(self, identity: str, timings: ElectionTimings) -> None:
        self.identity = identity
        self.timings = timings
        self.lease: Lease | None = None  # last object seen or written; None = absent
        self.observed: LeaseRecord | None = None  # last record seen (kept when the lease vanishes)
        self.observed_at = 0.0  # when `observed` last changed, by our clock
        self.leading = False
        self.renewed_at = 0.0  # when we sent the last write that succeeded while leading
        self._written: LeaseRecord | None = None  # the record our last successful write stored
        self._unconfirmed: list[tuple[LeaseRecord, float]] = []  # writes whose outcome we never saw

    # -- reading

    def observe(self, lease: Lease | None, now: float) -> bool:
        """Take in a fresh read. Returns False when we were leading and have now lost."""
        record = lease.record if lease is not None else None
        for sent, sent_at in self._unconfirmed:
            if lease is not None and record == sent:
                # A write whose reply we missed did land: it is ours, sent at that time.
                self.wrote(lease, sent_at, now)
                return True
        self._unconfirmed = []
        if lease is None:
            if self.lease is not None and self.observed is not None and self.observed.holder:
                # Deleted under a holder: respect that holder until its record would have expired.
                self.observed_at = now
            self.lease = None
            if self.leading:
                self.leading = False
                return False
            return True
        self.lease = lease
        if record != self.observed:
            self.observed = record
            self.observed_at = now
        if self.leading and record != self._written:
            self.leading = False
            return False
        return True

    def holder(self) -> str:
        return self.observed.holder if self.observed is not None else ""

    def deadline(self) -> float:
        """When a leader that has not renewed must have begun stopping its command."""
        return self.renewed_at + self.timings.renew_deadline

    def expires_at(self) -> float | None:
        """When the observed record may be taken over by us; None when it is free now."""
        record = self.observed
        if record is None or self.leading:
            return None
        if not record.holder and (self.lease is None or record.duration_seconds <= RELEASED_DURATION_SECONDS):
            return None
        duration = record.duration_seconds if record.duration_seconds > 0 else self.timings.duration
        return self.observed_at + duration

    # -- deciding

    def claim(self, now: float, wall: datetime) -> LeaseRecord | None:
        """The record to write to acquire or renew, or None while someone else holds it."""
        stamp = format_micro_time(wall)
        record = self.observed
        if self.leading and record is not None:
            return LeaseRecord(
                holder=self.identity,
                duration_seconds=self.timings.duration,
                acquire_time=record.acquire_time,
                renew_time=stamp,
                transitions=record.transitions,
            )
        expiry = self.expires_at()
        if expiry is not None and now < expiry:
            return None
        if record is None:
            transitions = 0
        elif self.lease is None:
            transitions = record.transitions + 1 if record.holder else record.transitions
        else:
            transitions = record.transitions + 1
        return LeaseRecord(self.identity, self.timings.duration, stamp, stamp, transitions)

    def release_record(self, wall: datetime) -> LeaseRecord | None:
        """The record that hands the lease back, or None when we do not hold it."""
        if not self.leading or self.observed is None:
            return None
        stamp = format_micro_time(wall)
        return LeaseRecord("", RELEASED_DURATION_SECONDS, stamp, stamp, self.observed.transitions)

    # -- writing

    def sending(self, record: LeaseRecord, sent_at: float) -> None:
        self._unconfirmed.append((record, sent_at))

    def rejected(self, record: LeaseRecord) -> None:
        """The apiserver refused the write (409/404): it certainly did not land."""
        self._unconfirmed = [(sent, at) for sent, at in self._unconfirmed if sent != record]

    def wrote(self, lease: Lease, sent_at: float, now: float) -> None:
        """A write succeeded; the server's echo is the record we now stand behind."""
        self._unconfirmed = []
        self.lease = lease
        self._written = lease.record
        if lease.record != self.observed:
            self.observed = lease.record
            self.observed_at = now
        self.leading = lease.record.holder == self.identity
        if self.leading:
            self.renewed_at = sent_at

    def step_down(self) -> None:
        self.leading = False
