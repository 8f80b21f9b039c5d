"""The elector loop: campaign for the lease, run the command while leading, stop it in time.

Level-triggered, as a controller: every turn compares what is (leading? command running?) with
what should be, so no single lost reply or failed request can leave a leader without its
command (issue 13.4: an acquire whose reply was lost, adopted by the next read, then a failed
renewal, once left the lease held and beat never started).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable

from celery_fleet.elector.election import Election, Lease, LeaseApi, LeaseApiError, LeaseConflict, LeaseRecord
from celery_fleet.elector.process import UNKILLABLE_AFTER_SECONDS, Clock, Command, Emit, Fence, Shutdown

EXIT_COMMAND_NOT_FOUND = 127


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
        fence: Fence,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.election = election
        self.api = api
        self.command = command
        self.clock = clock
        self.shutdown = shutdown
        self.emit = emit
        self.fence = fence
        self.jitter = jitter
        self.timings = election.timings
        self.running = False
        self.turned_at = clock.monotonic()  # when the loop last came round (a liveness signal)
        self._failing = False  # inside a streak of failed API calls (logged once)
        self._reported_holder: str | None = None

    def run(self) -> int:
        next_attempt = self.clock.monotonic()
        while True:
            self.turned_at = self.clock.monotonic()
            if self.shutdown.signum is not None:
                return self._shut_down(self.shutdown.signum)
            now = self.clock.monotonic()
            # Before looking at the command: one the fence stopped has not died, it was fenced.
            if self.election.leading and (now >= self.election.deadline() or self.fence.fired()):
                self._lose("renew-deadline", f"no successful renewal for {self.timings.renew_deadline:g}s")
                continue
            if self.running:
                code = self.command.poll()
                if code is not None:
                    return self._command_died(code)
            if now >= next_attempt:
                self._attempt()
                # Candidates poll a little early rather than late: failover stays within duration + retry.
                spread = 1.0 if self.election.leading else 1.0 - 0.1 * self.jitter()
                next_attempt = now + self.timings.retry_period * spread
            if self.election.leading and not self.running:
                exit_status = self._start_command()
                if exit_status is not None:
                    return exit_status
            wake = next_attempt
            if self.election.leading:
                wake = min(wake, self.election.deadline())
            else:
                expiry = self.election.expires_at()
                if expiry is not None and expiry > self.clock.monotonic():
                    wake = min(wake, expiry)
                    next_attempt = min(next_attempt, expiry)
            self.clock.wait(max(0.0, wake - self.clock.monotonic()))

    # -- one round of acquire-or-renew (the loop starts the command; this only talks to the apiserver)

    def _attempt(self) -> None:
        election = self.election
        try:
            if election.leading and election.lease is not None:
                # Fast path, as client-go: renew against the cached version without a read.
                record = election.claim(self.clock.monotonic(), self.clock.wall())
                assert record is not None
                try:
                    self._write(election.lease, record)
                    self._recovered()
                    return
                except LeaseConflict:
                    pass
            lease = self.api.get(self._timeout())
            was_leading = election.leading
            if not election.observe(lease, self.clock.monotonic()):
                self._lose("lease-changed", f"lease now held by {election.holder() or '<nobody>'}")
                return
            if election.leading and not was_leading:
                self._acquired()  # a write whose reply we missed did land
            self._report_holder()
            record = election.claim(self.clock.monotonic(), self.clock.wall())
            if record is not None:
                was_leading = election.leading
                self._write(lease, record)
                if election.leading and not was_leading:
                    self._acquired()
            self._recovered()
        except LeaseConflict:
            # Someone wrote first: normal when racing for a free lease; the next round re-reads.
            self._recovered()
        except LeaseApiError as exc:
            self._failed(exc)
        self._report_holder()

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
        if self.election.leading:
            self.fence.hold(self.election.deadline())

    def _timeout(self) -> float:
        """A leader's request may not outlive its deadline; a candidate's is merely bounded."""
        if self.election.leading:
            return max(0.05, self.election.deadline() - self.clock.monotonic())
        return max(1.0, self.timings.retry_period)

    # -- state changes

    def _acquired(self) -> None:
        self.fence.hold(self.election.deadline())
        observed = self.election.observed
        self.emit("acquired", transitions=observed.transitions if observed else 0)

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
        """Start the command while leading; returns an exit status only when it cannot be run."""
        if self.clock.monotonic() >= self.election.deadline() or self.fence.fired():
            return None  # the leadership is already stale; the loop steps down
        self.fence.hold(self.election.deadline())  # armed before the command exists: never unfenced
        try:
            pid = self.command.start()
        except OSError as exc:
            self.fence.release()
            self.emit("cmd-failed", error=str(exc))
            self._release()
            return EXIT_COMMAND_NOT_FOUND
        self.running = True
        self.emit("cmd-started", pid=pid)
        return None

    def _stop_command(self) -> int | None:
        """SIGTERM the group, SIGKILL it after the grace; returns the command's wait status."""
        if not self.running:
            self.fence.release()
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
        self.fence.release()
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
        self.fence.release()
        self.command.signal(signal.SIGKILL)  # stragglers in its group
        self.emit("cmd-exited", code=code)
        self._release()
        status = _exit_status(code)
        return status if status != 0 else 1
