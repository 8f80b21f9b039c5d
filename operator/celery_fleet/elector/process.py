"""The supervised command, time, signals, log lines and the fence. (process-level I/O)

The command runs in its own session (so its whole group can be signalled) with
PR_SET_PDEATHSIG, so killing the elector, even with SIGKILL, kills the command too.

The fence is a thread of its own: once armed with a renew deadline it stops the command at that
deadline unless a renewal moved it, whatever the loop is blocked on (a hung request, a DNS
lookup that ignores timeouts). The loop notices it has fired and steps down.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Protocol

from celery_fleet.elector.election import format_micro_time

# How long the elector waits for the command to die after SIGKILL before calling it unkillable.
UNKILLABLE_AFTER_SECONDS = 5.0


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

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self._proc = subprocess.Popen(
            self.argv,
            start_new_session=True,
            env=self.env,
            # The hook calls only prctl and getppid: no lock another thread (the fence, a health
            # server) could hold at fork time is needed in the child.
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


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> datetime: ...

    def wait(self, seconds: float) -> None:
        """Sleep, returning early when a signal (shutdown, child exit) or the fence wakes us."""


class Shutdown:
    """Set by the SIGTERM/SIGINT handler; read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum


class SystemClock:
    """Real time; `wait` wakes on any handled signal (through the signal wakeup fd) or `wake()`."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(timezone.utc)  # noqa: UP017 (3.8 has no datetime.UTC)

    def wake(self) -> None:
        """From any thread: end the current or next `wait` at once."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

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


class Fence(Protocol):
    def hold(self, deadline: float) -> None:
        """Arm the fence, or move its deadline (monotonic seconds) after a renewal."""

    def release(self) -> None:
        """Disarm: the loop stopped the command itself, or never started it."""

    def fired(self) -> bool:
        """The deadline passed while armed (until `release`)."""


class ThreadFence:
    """Stops the command at the renew deadline from a thread of its own.

    SIGTERM at the deadline, SIGKILL `stop_grace` later, unless the loop released the fence in
    between (it then stops the command itself, or has started a new one that is not ours to kill).
    """

    def __init__(
        self,
        command: Command,
        stop_grace: float,
        wake: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._command = command
        self._stop_grace = stop_grace
        self._wake = wake
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._fired = False
        self._generation = 0  # bumped by release: a SIGKILL pending from an older arming is dropped
        self._thread: threading.Thread | None = None

    def hold(self, deadline: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="elector-fence", daemon=True)
                self._thread.start()
            self._deadline = deadline
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._deadline = None
            self._fired = False
            self._generation += 1
            self._cond.notify_all()

    def fired(self) -> bool:
        with self._cond:
            return self._fired

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._deadline is None or self._deadline > self._monotonic():
                    timeout = None if self._deadline is None else self._deadline - self._monotonic()
                    self._cond.wait(timeout)
                self._deadline = None
                self._fired = True
                generation = self._generation
                self._command.signal(signal.SIGTERM)
            self._wake()
            kill_at = self._monotonic() + self._stop_grace
            with self._cond:
                while self._generation == generation and self._monotonic() < kill_at:
                    self._cond.wait(kill_at - self._monotonic())
                if self._generation == generation:
                    self._command.signal(signal.SIGKILL)
            self._wake()
