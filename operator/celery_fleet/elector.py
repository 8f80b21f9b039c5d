"""Run a command only while this process holds a Kubernetes Lease.

    python elector.py --namespace NS --lease NAME --identity ID \\
        [--duration 15 --renew-deadline 10 --retry-period 2] -- celery -A app beat

This is the fence around Celery Beat: exactly one pod runs `celery beat`, a hot
standby takes over when it dies, and the old leader stops beat *before* anyone
else may acquire, even when it is cut off from the apiserver.

The file is copied into the user's Celery image (which has Python and Celery
and nothing of ours), so it uses the standard library only and stays runnable
on Python 3.8+.

Semantics follow client-go's leaderelection:
- a lease is free when nobody holds it, or when its record has not changed for
  its leaseDurationSeconds as measured by *our own* monotonic clock from when
  we first saw that record (robust to clock skew between nodes);
- every write is a compare-and-swap on resourceVersion (409 -> re-read);
- leaseTransitions counts holder changes;
- the leader renews every retry period and stops the command once it has not
  renewed for renew-deadline (< duration), counted from when it *sent* its last
  successful write, so it has stopped before any standby sees the lease expire.

Stricter than client-go, because a second beat sends every periodic task twice:
- a leader that sees the record written by someone else stops at once instead
  of retrying until its deadline;
- a record naming us that we did not write in this process (a hand edit, or a
  previous incarnation of this pod) is treated as held until it expires;
- an empty holder is free at once only when written as a release (duration 1 s)
  or never held; a holder cleared by hand waits out the record's duration;
- the command is started with PR_SET_PDEATHSIG, so killing the elector (even
  with SIGKILL) kills the command too.

In a pod: an init container from the operator's image copies this file into a
shared emptyDir (`python -c "import shutil, celery_fleet.elector as e;
shutil.copy(e.__file__, '/celery-fleet/elector.py')"`), and the user's image runs
`python3 /celery-fleet/elector.py --lease NAME -- celery -A APP beat ...` with
POD_NAME and POD_NAMESPACE from the downward API. Credentials come from the
mounted service account (the token file is re-read on every request, as it
rotates). RBAC: get and update on that one Lease (plus create on leases when
nobody pre-creates it). Locally: --kubeconfig, whose YAML is read by a small
parser for the subset kubeconfigs use (there is no YAML in the standard
library), or a JSON kubeconfig, or explicit --server/--ca-file/--token-file/
--client-cert/--client-key.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NoReturn, Protocol

# Annotations are never evaluated (PEP 563), so the modern spellings below stay valid on 3.8;
# nothing here subscripts a generic at runtime.

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = "celery-fleet-elector/0.1"
LEASES_API = "/apis/coordination.k8s.io/v1"
# Written into the record on release; an empty holder with this duration is free at once.
RELEASED_DURATION_SECONDS = 1
EXIT_USAGE = 2
UNKILLABLE_AFTER_SECONDS = 5.0
EXIT_COMMAND_NOT_FOUND = 127
LEASE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class UsageError(ValueError):
    """A bad flag or environment value; the message names it and says how to fix it."""


class LeaseApiError(Exception):
    """The apiserver could not be reached or refused a lease request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LeaseConflict(LeaseApiError):
    """Our view of the lease is stale (409, or it was deleted): re-read before writing."""


# --------------------------------------------------------------------------- lease records


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
    def get(self, timeout: float) -> Lease | None:
        """The lease, or None when it does not exist."""

    def create(self, record: LeaseRecord, timeout: float) -> Lease:
        """Raises LeaseConflict when it already exists."""

    def replace(self, lease: Lease, record: LeaseRecord, timeout: float) -> Lease:
        """Compare-and-swap on lease.resource_version; raises LeaseConflict when stale."""


# --------------------------------------------------------------------------- the election (pure)


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


# --------------------------------------------------------------------------- the supervised command


class Command(Protocol):
    def start(self) -> int:
        """Start the command; returns its pid. Raises OSError when it cannot be run."""

    def poll(self) -> int | None:
        """Exit status (negative = killed by that signal) once it has exited, else None."""

    def signal(self, signum: int) -> None:
        """Send a signal to the command's whole process group."""


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec hook asking Linux to SIGKILL the child when the elector dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (ImportError, OSError, AttributeError):
        prctl = None

    def hook() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the elector died before prctl took effect
            os._exit(1)

    return hook


class ChildProcess:
    """The real command, in its own session so its whole group can be signalled."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self._proc = subprocess.Popen(
            self.argv,
            start_new_session=True,
            # The elector is single-threaded, so a preexec hook cannot deadlock on a lock held elsewhere.
            preexec_fn=_die_with_parent(os.getpid()),
        )
        return self._proc.pid

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def signal(self, signum: int) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)


# --------------------------------------------------------------------------- time and signals


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> datetime: ...

    def wait(self, seconds: float) -> None:
        """Sleep, returning early when a signal (shutdown, child exit) arrives."""


class Shutdown:
    """Set by the SIGTERM/SIGINT handler; read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum


class SystemClock:
    """Real time; `wait` wakes on any handled signal through a self-pipe."""

    def __init__(self) -> None:
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(timezone.utc)  # noqa: UP017 (3.8 has no datetime.UTC)

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            select.select([self._wake_r], [], [], seconds)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass


def install_signal_handlers(shutdown: Shutdown) -> None:
    signal.signal(signal.SIGTERM, lambda signum, _frame: shutdown.request(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: shutdown.request(signum))
    # A Python-level handler makes the child's exit write to the wakeup pipe.
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)


# --------------------------------------------------------------------------- log lines


class Emit(Protocol):
    def __call__(self, event: str, **fields: object) -> None: ...


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def stderr_log(prefix: Mapping[str, object], clock: Callable[[], datetime]) -> Emit:
    """One line per state change: `<UTC time> elector event=<event> k=v ...`."""

    def emit(event: str, **fields: object) -> None:
        parts = [format_micro_time(clock()), "elector", f"event={event}"]
        parts += [f"{k}={_quote(v)}" for k, v in {**prefix, **fields}.items()]
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()

    return emit


# --------------------------------------------------------------------------- the elector loop


def _exit_status(code: int) -> int:
    """A shell-style exit status for the command's wait status (128+N when killed by signal N)."""
    return 128 - code if code < 0 else code


class Elector:
    """Campaigns for the lease, runs the command while leading, stops it before the lease can lapse."""

    def __init__(
        self,
        election: Election,
        api: LeaseApi,
        command: Command,
        clock: Clock,
        shutdown: Shutdown,
        emit: Emit,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.election = election
        self.api = api
        self.command = command
        self.clock = clock
        self.shutdown = shutdown
        self.emit = emit
        self.jitter = jitter
        self.timings = election.timings
        self.running = False
        self._failing = False  # inside a streak of failed API calls (logged once)
        self._reported_holder: str | None = None

    def run(self) -> int:
        next_attempt = self.clock.monotonic()
        while True:
            if self.shutdown.signum is not None:
                return self._shut_down(self.shutdown.signum)
            if self.running:
                code = self.command.poll()
                if code is not None:
                    return self._command_died(code)
            now = self.clock.monotonic()
            if self.election.leading and now >= self.election.deadline():
                self._lose("renew-deadline", f"no successful renewal for {self.timings.renew_deadline:g}s")
                continue
            if now >= next_attempt:
                exit_status = self._attempt()
                if exit_status is not None:
                    return exit_status
                # Candidates poll a little early rather than late: failover stays within duration + retry.
                spread = 1.0 if self.election.leading else 1.0 - 0.1 * self.jitter()
                next_attempt = now + self.timings.retry_period * spread
            wake = next_attempt
            if self.election.leading:
                wake = min(wake, self.election.deadline())
            else:
                expiry = self.election.expires_at()
                if expiry is not None and expiry > self.clock.monotonic():
                    wake = min(wake, expiry)
                    next_attempt = min(next_attempt, expiry)
            self.clock.wait(max(0.0, wake - self.clock.monotonic()))

    # -- one round of acquire-or-renew

    def _attempt(self) -> int | None:
        """Try to acquire or renew once. Returns an exit status only when the command cannot start."""
        election = self.election
        was_leading = election.leading
        try:
            if election.leading and election.lease is not None:
                # Fast path, as client-go: renew against the cached version without a read.
                record = election.claim(self.clock.monotonic(), self.clock.wall())
                assert record is not None
                try:
                    self._write(election.lease, record)
                    self._recovered()
                    return None
                except LeaseConflict:
                    pass
            lease = self.api.get(self._timeout())
            if not election.observe(lease, self.clock.monotonic()):
                self._lose("lease-changed", f"lease now held by {election.holder() or '<nobody>'}")
                return None
            self._report_holder()
            record = election.claim(self.clock.monotonic(), self.clock.wall())
            if record is None:
                self._recovered()
                return None
            self._write(lease, record)
            self._recovered()
        except LeaseConflict:
            # Someone wrote first: normal when racing for a free lease; the next round re-reads.
            self._recovered()
            return None
        except LeaseApiError as exc:
            self._failed(exc)
            return None
        self._report_holder()
        if election.leading and not was_leading:
            self.emit("acquired", transitions=election.observed.transitions if election.observed else 0)
            return self._start_command()
        return None

    def _write(self, lease: Lease | None, record: LeaseRecord, timeout: float | None = None) -> None:
        sent_at = self.clock.monotonic()
        timeout = self._timeout() if timeout is None else timeout
        self.election.sending(record, sent_at)
        try:
            written = self.api.create(record, timeout) if lease is None else self.api.replace(lease, record, timeout)
        except LeaseConflict:
            self.election.rejected(record)
            raise
        self.election.wrote(written, sent_at, self.clock.monotonic())

    def _timeout(self) -> float:
        """A leader's request may not outlive its deadline; a candidate's is merely bounded."""
        if self.election.leading:
            return max(0.05, self.election.deadline() - self.clock.monotonic())
        return max(1.0, self.timings.retry_period)

    # -- state changes

    def _report_holder(self) -> None:
        holder = self.election.holder()
        if holder != self._reported_holder:
            self._reported_holder = holder
            self.emit("observed-holder", holder=holder or "<nobody>")

    def _failed(self, exc: LeaseApiError) -> None:
        if not self._failing:
            self._failing = True
            event = "renew-failed" if self.election.leading else "api-error"
            self.emit(event, status=exc.status or "-", error=str(exc))

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            self.emit("api-recovered")

    def _start_command(self) -> int | None:
        if self.clock.monotonic() >= self.election.deadline():
            return None  # the acquisition is already stale; the loop will step down
        try:
            pid = self.command.start()
        except OSError as exc:
            self.emit("cmd-failed", error=str(exc))
            self._release()
            return EXIT_COMMAND_NOT_FOUND
        self.running = True
        self.emit("cmd-started", pid=pid)
        return None

    def _stop_command(self) -> int | None:
        """SIGTERM the group, SIGKILL it after the grace; returns the command's wait status."""
        if not self.running:
            return None
        self.emit("cmd-stopping", signal="SIGTERM")
        self.command.signal(signal.SIGTERM)
        give_up = self.clock.monotonic() + self.timings.stop_grace
        code = self.command.poll()
        while code is None and self.clock.monotonic() < give_up:
            self.clock.wait(min(0.05, give_up - self.clock.monotonic()))
            code = self.command.poll()
        # Kill the whole group even after a clean exit: a straggler would be an unfenced scheduler.
        self.command.signal(signal.SIGKILL)
        give_up = self.clock.monotonic() + UNKILLABLE_AFTER_SECONDS
        while code is None and self.clock.monotonic() < give_up:
            self.clock.wait(0.02)
            code = self.command.poll()
        self.running = False
        self.emit("cmd-stopped", code="unkillable" if code is None else code)
        return code

    def _lose(self, reason: str, detail: str) -> None:
        self.election.step_down()
        self.emit("lost", reason=reason, detail=detail)
        self._stop_command()

    def _release(self) -> None:
        """Hand the lease back so a standby takes over within a retry period instead of a duration.

        Only after the command has stopped; the compare-and-swap keeps it from clearing anyone else's hold.
        """
        election = self.election
        timeout = max(1.0, self.timings.retry_period)
        for _ in range(2):
            record = election.release_record(self.clock.wall())
            if record is None or election.lease is None:
                return
            try:
                self._write(election.lease, record, timeout)
                self.emit("released", transitions=record.transitions)
                return
            except LeaseConflict:
                try:
                    if not election.observe(self.api.get(timeout), self.clock.monotonic()):
                        return  # someone else holds it now: nothing of ours to release
                except LeaseApiError as exc:
                    self.emit("release-failed", error=str(exc))
                    return
            except LeaseApiError as exc:
                self.emit("release-failed", error=str(exc))
                return
        self.emit("release-failed", error="lease kept changing")

    def _shut_down(self, signum: int) -> int:
        self.emit("shutdown", signal=signal.Signals(signum).name)
        self._stop_command()
        self._release()
        return 0

    def _command_died(self, code: int) -> int:
        self.running = False
        self.command.signal(signal.SIGKILL)  # stragglers in its group
        self.emit("cmd-exited", code=code)
        self._release()
        status = _exit_status(code)
        return status if status != 0 else 1


# --------------------------------------------------------------------------- talking to the apiserver


@dataclass
class ApiEndpoint:
    """Where the apiserver is and how to prove who we are."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: bytes | None = None  # PEM
    client_key_data: bytes | None = None  # PEM
    token: str | None = None
    token_file: str | None = None  # re-read on every request: service account tokens rotate
    insecure: bool = False
    tls_server_name: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        cert, key = self.client_cert_file, self.client_key_file
        if self.client_cert_data is not None or self.client_key_data is not None:
            # ssl loads a client key only from a file: stage it privately, load, delete at once.
            with tempfile.TemporaryDirectory(prefix="elector-") as scratch:
                if self.client_cert_data is not None:
                    cert = _private_file(scratch, "client.crt", self.client_cert_data)
                if self.client_key_data is not None:
                    key = _private_file(scratch, "client.key", self.client_key_data)
                if cert is not None:
                    context.load_cert_chain(cert, key)
        elif cert is not None:
            context.load_cert_chain(cert, key)
        return context

    def bearer_token(self) -> str | None:
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as handle:
                    return handle.read().strip()
            except OSError as exc:
                raise LeaseApiError(f"cannot read token file {self.token_file}: {exc}") from exc
        return self.token


def _private_file(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS with an overridable TLS server name (kubeconfig `tls-server-name`)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float, server_name: str | None) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._tls_context = context
        self._server_name = server_name or host

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls_context.wrap_socket(self.sock, server_hostname=self._server_name)


class HttpLeaseApi:
    """The Lease endpoints over one kept-alive connection, rebuilt after any failure."""

    def __init__(self, endpoint: ApiEndpoint, namespace: str, name: str) -> None:
        parts = urllib.parse.urlsplit(endpoint.server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"--server {endpoint.server!r}: expected https://HOST[:PORT]")
        self.endpoint = endpoint
        self.namespace = namespace
        self.name = name
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._context = endpoint.ssl_context() if self._https else None
        quote = urllib.parse.quote
        self._collection = f"{parts.path.rstrip('/')}{LEASES_API}/namespaces/{quote(namespace, safe='')}/leases"
        self._item = f"{self._collection}/{quote(name, safe='')}"
        self._conn: http.client.HTTPConnection | None = None

    def get(self, timeout: float) -> Lease | None:
        status, body = self._request("GET", self._item, None, timeout)
        if status == 404:
            return None
        self._expect(status, body, "GET", (200,))
        return Lease.from_body(body)

    def create(self, record: LeaseRecord, timeout: float) -> Lease:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.to_spec(),
        }
        status, reply = self._request("POST", self._collection, body, timeout)
        if status == 409:
            raise LeaseConflict("lease was created by someone else", 409)
        self._expect(status, reply, "POST", (200, 201))
        return Lease.from_body(reply)

    def replace(self, lease: Lease, record: LeaseRecord, timeout: float) -> Lease:
        body = copy.deepcopy(dict(lease.body))
        metadata = body.setdefault("metadata", {})
        metadata["resourceVersion"] = lease.resource_version
        metadata.pop("managedFields", None)  # omitted = kept as they are
        spec = dict(body.get("spec") or {})
        spec.update(record.to_spec())  # keep fields we do not own (preferredHolder, strategy)
        body["spec"] = spec
        status, reply = self._request("PUT", self._item, body, timeout)
        if status in (404, 409):
            raise LeaseConflict("lease changed since it was read" if status == 409 else "lease was deleted", status)
        self._expect(status, reply, "PUT", (200,))
        return Lease.from_body(reply)

    def _expect(self, status: int, body: Mapping[str, Any], method: str, ok: tuple[int, ...]) -> None:
        if status in ok:
            return
        message = body.get("message") or body.get("reason") or "unexpected reply"
        hint = ""
        if status in (401, 403):
            hint = " (check the credentials and that RBAC allows get/update/create on this lease)"
        raise LeaseApiError(f"{method} lease {self.namespace}/{self.name}: HTTP {status}: {message}{hint}", status)

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        token = self.endpoint.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn = self._connection(timeout)
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            if response.will_close:
                self._drop()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            reason = str(exc) or type(exc).__name__
            raise LeaseApiError(f"{method} lease {self.namespace}/{self.name}: {reason}") from exc
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw[:200].decode("utf-8", "replace")}
        return response.status, decoded if isinstance(decoded, dict) else {}

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._context is not None:
                self._conn = _TLSConnection(
                    self._host, self._port, self._context, timeout, self.endpoint.tls_server_name
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------- kubeconfig


class KubeconfigError(UsageError):
    pass


_JSON_HINT = "or pass a JSON kubeconfig (`kubectl config view --raw --minify --flatten -o json`)"


class _YamlSubset:
    """Just enough YAML for kubeconfigs as kubectl, kind and kwokctl write them.

    Block mappings and sequences, plain/quoted scalars, `{}`/`[]`, comments.
    Anything else (anchors, tags, flow collections, multi-line scalars) is
    refused with the line number rather than misread.
    """

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines: list[tuple[int, int, str]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            body = raw.rstrip()
            content = body.lstrip(" ")
            if not content or content.startswith("#"):
                continue
            if content.startswith("\t"):
                self._fail(number, "tabs are not allowed for indentation")
            if content == "---" and not self.lines:
                continue
            if content in ("---", "..."):
                self._fail(number, "only one YAML document is supported")
            if content.startswith("%"):
                self._fail(number, "YAML directives are not supported")
            self.lines.append((number, len(body) - len(content), content))
        self.pos = 0

    def parse(self) -> Any:
        if not self.lines:
            return {}
        value = self._block(self.lines[0][1])
        if self.pos < len(self.lines):
            self._fail(self.lines[self.pos][0], "unexpected indentation")
        return value

    def _fail(self, line: int, message: str) -> NoReturn:
        raise KubeconfigError(f"kubeconfig {self.source} line {line}: {message}; {_JSON_HINT}")

    @staticmethod
    def _is_item(content: str) -> bool:
        return content == "-" or content.startswith("- ")

    def _block(self, indent: int) -> Any:
        content = self.lines[self.pos][2]
        return self._sequence(indent) if self._is_item(content) else self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while self.pos < len(self.lines):
            number, ind, content = self.lines[self.pos]
            if ind < indent or (ind == indent and not self._is_item(content)):
                break
            if ind > indent:
                self._fail(number, "unexpected indentation")
            rest = content[1:].lstrip(" ")
            if not rest:
                self.pos += 1
                if self.pos < len(self.lines) and self.lines[self.pos][1] > indent:
                    items.append(self._block(self.lines[self.pos][1]))
                else:
                    items.append(None)
                continue
            column = ind + len(content) - len(rest)
            self.lines[self.pos] = (number, column, rest)
            if self._is_item(rest) or self._split_key(rest, number) is not None:
                items.append(self._block(column))
            else:
                items.append(self._scalar(rest, number))
                self.pos += 1
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self.pos < len(self.lines):
            number, ind, content = self.lines[self.pos]
            if ind < indent:
                break
            if ind > indent or self._is_item(content):
                self._fail(number, "unexpected indentation")
            entry = self._split_key(content, number)
            if entry is None:
                self._fail(number, f"expected `key: value`, got {content!r}")
            key, rest = entry
            if key in result:
                self._fail(number, f"duplicate key {key!r}")
            self.pos += 1
            if rest:
                result[key] = self._scalar(rest, number)
                continue
            following = self.lines[self.pos] if self.pos < len(self.lines) else None
            if following is not None and following[1] > indent:
                result[key] = self._block(following[1])
            elif following is not None and following[1] == indent and self._is_item(following[2]):
                result[key] = self._sequence(indent)  # kubectl writes `key:\n- item` at the key's column
            else:
                result[key] = None
        return result

    def _split_key(self, content: str, number: int) -> tuple[str, str] | None:
        if content[0] in "\"'":
            end = self._closing_quote(content, number)
            after = content[end + 1 :].lstrip(" ")
            if not after.startswith(":") or (len(after) > 1 and after[1] != " "):
                return None
            return str(self._scalar(content[: end + 1], number)), after[1:].strip()
        if content.startswith(("? ", "&", "*", "!", "{", "[")):
            return None
        index = content.find(": ")
        if index < 0:
            if content.endswith(":"):
                return content[:-1].rstrip(), ""
            return None
        return content[:index].rstrip(), content[index + 2 :].strip()

    def _closing_quote(self, content: str, number: int) -> int:
        quote = content[0]
        index = 1
        while index < len(content):
            char = content[index]
            if quote == '"' and char == "\\":
                index += 2
                continue
            if char == quote:
                if quote == "'" and content[index + 1 : index + 2] == "'":
                    index += 2
                    continue
                return index
            index += 1
        self._fail(number, "unterminated quoted string (multi-line strings are not supported)")

    def _scalar(self, text: str, number: int) -> Any:
        if text[0] in "\"'":
            end = self._closing_quote(text, number)
            trailing = text[end + 1 :].strip()
            if trailing and not trailing.startswith("#"):
                self._fail(number, f"unexpected text after a quoted string: {trailing!r}")
            inner = text[: end + 1]
            if inner[0] == "'":
                return inner[1:-1].replace("''", "'")
            try:
                return json.loads(inner)
            except ValueError:
                self._fail(number, f"unsupported escape in {inner!r}")
        comment = re.search(r"\s#", text)
        if comment:
            text = text[: comment.start()].rstrip()
        if text in ("{}", "[]"):
            return {} if text == "{}" else []
        if text[0] in "{[":
            self._fail(number, "flow collections are not supported")
        if text[0] in "|>":
            self._fail(number, "block scalars (| and >) are not supported")
        if text[0] in "&*!":
            self._fail(number, "anchors, aliases and tags are not supported")
        if text in ("null", "Null", "NULL", "~"):
            return None
        if text in ("true", "True", "TRUE"):
            return True
        if text in ("false", "False", "FALSE"):
            return False
        return text


def parse_kubeconfig(text: str, source: str) -> dict[str, Any]:
    """A kubeconfig document from JSON or the YAML subset kubeconfigs use."""
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise KubeconfigError(f"kubeconfig {source}: invalid JSON: {exc}") from exc
    else:
        document = _YamlSubset(text, source).parse()
    if not isinstance(document, dict):
        raise KubeconfigError(f"kubeconfig {source}: expected a mapping at the top level")
    return document


def _named(document: Mapping[str, Any], section: str, name: str, source: str) -> dict[str, Any]:
    for entry in document.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(section[:-1])
            return dict(value) if isinstance(value, dict) else {}
    raise KubeconfigError(f"kubeconfig {source}: no {section[:-1]} named {name!r} in `{section}`")


def _merge_kubeconfigs(documents: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """kubectl's rule for KUBECONFIG=a:b: the first file to name something wins."""
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": []}
    for _path, document in documents:
        if "current-context" not in merged and document.get("current-context"):
            merged["current-context"] = document["current-context"]
        for section in ("clusters", "users", "contexts"):
            seen = {entry.get("name") for entry in merged[section]}
            for entry in document.get(section) or []:
                if isinstance(entry, dict) and entry.get("name") not in seen:
                    merged[section].append(entry)
    return merged


def endpoint_from_kubeconfig(paths: Sequence[str], context_name: str | None) -> tuple[ApiEndpoint, str | None]:
    """The endpoint and the context's namespace from kubeconfig file(s)."""
    documents = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                documents.append((path, parse_kubeconfig(handle.read(), path)))
        except OSError as exc:
            raise KubeconfigError(f"--kubeconfig {path}: cannot read it: {exc}") from exc
    source = ":".join(paths)
    document = documents[0][1] if len(documents) == 1 else _merge_kubeconfigs(documents)
    base = os.path.dirname(os.path.abspath(paths[0]))
    name = context_name or document.get("current-context")
    if not name:
        raise KubeconfigError(f"kubeconfig {source}: no current-context; pass --context")
    context = _named(document, "contexts", name, source)
    cluster = _named(document, "clusters", str(context.get("cluster")), source)
    user = _named(document, "users", str(context.get("user")), source) if context.get("user") else {}
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if user.get(unsupported):
            raise KubeconfigError(
                f"kubeconfig {source}: user.{unsupported} is not supported by the elector; use a client "
                "certificate or a token (--token-file), or run in-cluster with a service account"
            )
    if not cluster.get("server"):
        raise KubeconfigError(f"kubeconfig {source}: cluster of context {name!r} has no server")

    def path_of(value: Any) -> str | None:
        return None if not value else os.path.join(base, str(value))

    def data_of(value: Any, field_name: str) -> bytes | None:
        if not value:
            return None
        try:
            return base64.b64decode(str(value), validate=True)
        except ValueError as exc:
            raise KubeconfigError(f"kubeconfig {source}: {field_name} is not valid base64") from exc

    ca_data = data_of(cluster.get("certificate-authority-data"), "certificate-authority-data")
    endpoint = ApiEndpoint(
        server=str(cluster["server"]),
        ca_file=path_of(cluster.get("certificate-authority")),
        ca_data=ca_data.decode("ascii", "replace") if ca_data else None,
        client_cert_file=path_of(user.get("client-certificate")),
        client_key_file=path_of(user.get("client-key")),
        client_cert_data=data_of(user.get("client-certificate-data"), "client-certificate-data"),
        client_key_data=data_of(user.get("client-key-data"), "client-key-data"),
        token=str(user["token"]) if user.get("token") else None,
        token_file=path_of(user.get("tokenFile")),
        insecure=cluster.get("insecure-skip-tls-verify") in (True, "true"),
        tls_server_name=cluster.get("tls-server-name"),
    )
    namespace = context.get("namespace")
    return endpoint, str(namespace) if namespace else None


def in_cluster_endpoint(environ: Mapping[str, str]) -> ApiEndpoint:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    return ApiEndpoint(
        server=f"https://{host}:{port}",
        ca_file=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"),
        token_file=os.path.join(SERVICE_ACCOUNT_DIR, "token"),
    )


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-fleet elect",
        usage="%(prog)s --lease NAME [options] -- CMD [ARGS...]",
        description="Run CMD only while holding a coordination.k8s.io/v1 Lease (one Celery Beat, hot standby).",
    )
    election = parser.add_argument_group("election")
    election.add_argument("--lease", required=True, help="Lease name")
    election.add_argument(
        "--namespace", help="Lease namespace (default: $POD_NAMESPACE, the service account's, or the context's)"
    )
    election.add_argument("--identity", help="holder identity (default: $POD_NAME, else the hostname)")
    election.add_argument("--duration", type=int, default=15, help="leaseDurationSeconds (default 15)")
    election.add_argument(
        "--renew-deadline", type=float, default=10.0, help="stop CMD after failing to renew this long (default 10)"
    )
    election.add_argument("--retry-period", type=float, default=2.0, help="renew/poll interval (default 2)")
    election.add_argument(
        "--stop-grace", type=float, help="SIGKILL CMD this long after SIGTERM (default (duration - renew-deadline) / 2)"
    )
    conn = parser.add_argument_group("apiserver (default: in-cluster, else $KUBECONFIG or ~/.kube/config)")
    conn.add_argument("--kubeconfig", help="kubeconfig path (YAML subset or JSON); overrides $KUBECONFIG")
    conn.add_argument("--context", help="kubeconfig context (default: current-context)")
    conn.add_argument("--server", help="apiserver URL; overrides the kubeconfig's")
    conn.add_argument("--ca-file", help="CA bundle to verify the apiserver")
    conn.add_argument("--client-cert", help="client certificate (PEM)")
    conn.add_argument("--client-key", help="client key (PEM)")
    conn.add_argument("--token-file", help="bearer token file, re-read on every request")
    conn.add_argument("--tls-server-name", help="name to verify the apiserver certificate against")
    conn.add_argument(
        "--insecure-skip-tls-verify", action="store_true", help="do not verify the apiserver (testing only)"
    )
    return parser


@dataclass
class Invocation:
    lease: str
    namespace: str
    identity: str
    timings: ElectionTimings
    endpoint: ApiEndpoint
    command: list[str]


def parse_invocation(argv: Sequence[str], environ: Mapping[str, str]) -> Invocation:
    args_list = list(argv)
    if args_list[:1] == ["elect"]:  # tolerate `celery-fleet elect ...` being passed through whole
        args_list = args_list[1:]
    if "--" not in args_list and ("-h" in args_list or "--help" in args_list):
        build_parser().parse_args(["--help"])  # prints the usage and exits 0
    if "--" not in args_list:
        raise UsageError("missing `-- CMD [ARGS...]`: put the command to run after `--`")
    split = args_list.index("--")
    options, command = args_list[:split], args_list[split + 1 :]
    if not command:
        raise UsageError("nothing after `--`: give the command to run, e.g. `-- celery -A app beat`")
    args = build_parser().parse_args(options)

    if not LEASE_NAME_RE.match(args.lease) or len(args.lease) > 253:
        raise UsageError(f"--lease {args.lease!r}: must be a DNS subdomain (lowercase letters, digits, '-', '.')")
    identity = args.identity or environ.get("POD_NAME") or socket.gethostname()
    if not identity:
        raise UsageError("--identity is empty: pass --identity or set POD_NAME")
    stop_grace = args.stop_grace
    if stop_grace is None:
        stop_grace = max(0.0, (args.duration - args.renew_deadline) / 2)
    timings = ElectionTimings(args.duration, args.renew_deadline, args.retry_period, stop_grace)
    timings.validate()

    kubeconfig = args.kubeconfig or environ.get("KUBECONFIG")
    context_namespace: str | None = None
    in_cluster = False
    if kubeconfig:
        paths = [p for p in kubeconfig.split(os.pathsep) if p]
        endpoint, context_namespace = endpoint_from_kubeconfig(paths, args.context)
    elif args.server:
        endpoint = ApiEndpoint(server=args.server)
    elif environ.get("KUBERNETES_SERVICE_HOST"):
        endpoint = in_cluster_endpoint(environ)
        in_cluster = True
    else:
        default = os.path.join(os.path.expanduser("~"), ".kube", "config")
        if not os.path.exists(default):
            raise UsageError(
                "no apiserver to talk to: not in a pod (KUBERNETES_SERVICE_HOST unset), no --kubeconfig, "
                "$KUBECONFIG or ~/.kube/config, and no --server"
            )
        endpoint, context_namespace = endpoint_from_kubeconfig([default], args.context)
    overrides = {
        "server": args.server,
        "ca_file": args.ca_file,
        "client_cert_file": args.client_cert,
        "client_key_file": args.client_key,
        "token_file": args.token_file,
        "tls_server_name": args.tls_server_name,
    }
    for attribute, value in overrides.items():
        if value:
            setattr(endpoint, attribute, value)
    if args.client_cert:
        endpoint.client_cert_data = endpoint.client_key_data = None
    if args.ca_file:
        endpoint.ca_data = None
    if args.insecure_skip_tls_verify:
        endpoint.insecure = True

    namespace = args.namespace or environ.get("POD_NAMESPACE") or context_namespace
    if not namespace and in_cluster:
        try:
            with open(os.path.join(SERVICE_ACCOUNT_DIR, "namespace"), encoding="utf-8") as handle:
                namespace = handle.read().strip()
        except OSError:
            namespace = None
    if not namespace:
        raise UsageError("no namespace for the lease: pass --namespace or set POD_NAMESPACE")

    if shutil.which(command[0]) is None:
        raise UsageError(f"command {command[0]!r} not found on PATH")
    return Invocation(args.lease, namespace, identity, timings, endpoint, command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        invocation = parse_invocation(argv, os.environ)
        api = HttpLeaseApi(invocation.endpoint, invocation.namespace, invocation.lease)
    except (UsageError, ssl.SSLError, OSError) as exc:
        sys.stderr.write(f"elector: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # argparse has printed the usage or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    clock = SystemClock()
    shutdown = Shutdown()
    install_signal_handlers(shutdown)
    emit = stderr_log(
        {"lease": f"{invocation.namespace}/{invocation.lease}", "identity": invocation.identity}, clock.wall
    )
    timings = invocation.timings
    emit(
        "starting",
        server=invocation.endpoint.server,
        duration=timings.duration,
        renew_deadline=f"{timings.renew_deadline:g}",
        retry_period=f"{timings.retry_period:g}",
        stop_grace=f"{timings.stop_grace:g}",
    )
    elector = Elector(
        Election(invocation.identity, timings),
        api,
        ChildProcess(invocation.command),
        clock,
        shutdown,
        emit,
    )
    return elector.run()


if __name__ == "__main__":
    sys.exit(main())
