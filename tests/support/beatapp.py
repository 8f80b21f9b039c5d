"""A tiny Celery app for Beat tests, and a harness to run it under competing electors.

`celery -A tests.support.beatapp beat` sends the task `beatapp.tick` on every whole
wall-clock second. No worker consumes it, so each tick stays in Redis as a message
in the list BEAT_TICK_QUEUE (default "ticks") whose headers carry the second it was
scheduled for (`tick_slot`), who sent it (`tick_sender`, from BEAT_SENDER) and when
(`tick_published_at`). Because slots are aligned to the wall clock, two schedulers
running at once send the *same* slot twice: a duplicate is exact, not a guess.

Environment: BEAT_BROKER_URL (required), BEAT_TICK_QUEUE, BEAT_SENDER.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.schedules import schedstate, schedule
from celery.signals import before_task_publish

from celery_fleet.elector import BUNDLE_FILE_NAME, bundle
from celery_fleet.leader import endpoint_from_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
TICK_TASK = "beatapp.tick"
QUEUE = os.environ.get("BEAT_TICK_QUEUE", "ticks")

app = Celery("beatapp", broker=os.environ.get("BEAT_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    beat_max_loop_interval=1,
    task_default_queue=QUEUE,
)

_due_slot: int | None = None  # the slot the schedule last declared due; stamped on the next publish


class every_whole_second(schedule):  # type: ignore[misc]  # lower-case like celery's own schedules
    """Due once per wall-clock second, at the start of that second."""

    def __init__(self) -> None:
        super().__init__(run_every=1.0)

    def is_due(self, last_run_at: datetime) -> schedstate:
        global _due_slot
        now = time.time()
        last = last_run_at.timestamp() if last_run_at is not None else 0.0
        until_next = math.floor(now) + 1 - now
        if math.floor(now) > math.floor(last):
            _due_slot = math.floor(now)
            return schedstate(True, until_next)
        return schedstate(False, until_next)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, ())


@app.task(name=TICK_TASK)  # type: ignore[untyped-decorator]
def tick() -> None:
    """Never run: the message itself is the record."""


app.conf.beat_schedule = {"tick": {"task": TICK_TASK, "schedule": every_whole_second()}}


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp_tick(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender != TICK_TASK or headers is None:
        return
    now = time.time()
    headers["tick_slot"] = _due_slot if _due_slot is not None else math.floor(now)
    headers["tick_sender"] = os.environ.get("BEAT_SENDER", f"pid-{os.getpid()}")
    headers["tick_published_at"] = now


# =========================================================================== reading the ticks


@dataclass(frozen=True)
class Tick:
    slot: int
    sender: str
    published_at: float


def read_ticks(client: Any, queue: str = "ticks") -> list[Tick]:
    """Every tick message in the queue, oldest first."""
    ticks = []
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        ticks.append(Tick(int(headers["tick_slot"]), str(headers["tick_sender"]), float(headers["tick_published_at"])))
    return sorted(ticks, key=lambda t: t.published_at)


@dataclass
class TickReport:
    ticks: list[Tick]
    duplicates: list[int]  # slots sent more than once
    missed: list[int]  # slots between the first and last tick that nobody sent
    longest_gap: float  # seconds between consecutive ticks (1.0 when healthy)
    senders: list[str]  # in order of taking over

    def describe(self) -> str:
        return (
            f"{len(self.ticks)} ticks from {self.senders}, duplicates={self.duplicates}, "
            f"missed={len(self.missed)} slots, longest gap {self.longest_gap:.2f}s"
        )


def analyse_ticks(ticks: list[Tick]) -> TickReport:
    counts = Counter(t.slot for t in ticks)
    duplicates = sorted(slot for slot, n in counts.items() if n > 1)
    missed: list[int] = []
    if counts:
        missed = [s for s in range(min(counts), max(counts) + 1) if s not in counts]
    gaps = [b.published_at - a.published_at for a, b in itertools.pairwise(ticks)]
    senders: list[str] = []
    for t in ticks:
        if not senders or senders[-1] != t.sender:
            senders.append(t.sender)
    return TickReport(ticks, duplicates, missed, max(gaps, default=0.0), senders)


# =========================================================================== electors as subprocesses

LOG_LINE = re.compile(r"^(?P<at>\S+) elector event=(?P<event>\S+)(?P<rest>.*)$")
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class ElectorEvent:
    at: float  # epoch seconds
    event: str
    fields: dict[str, str]


def parse_elector_log(text: str) -> list[ElectorEvent]:
    events = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue  # celery beat's own output shares the stream
        at = datetime.strptime(match["at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in FIELD.findall(match["rest"])}
        events.append(ElectorEvent(at, match["event"], fields))
    return events


@dataclass
class Timings:
    duration: int = 4
    renew_deadline: float = 3.0
    retry_period: float = 0.5

    def flags(self) -> list[str]:
        return [
            "--duration", str(self.duration),
            "--renew-deadline", f"{self.renew_deadline:g}",
            "--retry-period", f"{self.retry_period:g}",
        ]  # fmt: skip


@dataclass
class BeatElector:
    """`python elector.pyz ... -- celery -A tests.support.beatapp beat`, as a pod would run it."""

    identity: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed_at: float | None = None

    def events(self) -> list[ElectorEvent]:
        return parse_elector_log(self.log_path.read_text(errors="replace"))

    def times(self, event: str) -> list[float]:
        return [e.at for e in self.events() if e.event == event]

    def running_intervals(self, end: float) -> list[tuple[float, float]]:
        """When its beat ran: (cmd-started, cmd-stopped/cmd-exited or death/end)."""
        intervals: list[tuple[float, float]] = []
        start: float | None = None
        for e in self.events():
            if e.event == "cmd-started":
                start = e.at
            elif e.event in ("cmd-stopped", "cmd-exited") and start is not None:
                intervals.append((start, e.at))
                start = None
        if start is not None:
            intervals.append((start, self.killed_at or end))
        return intervals

    def beat_pid(self) -> int | None:
        pid = None
        for e in self.events():
            if e.event == "cmd-started":
                pid = int(e.fields["pid"])
            elif e.event in ("cmd-stopped", "cmd-exited"):
                pid = None
        return pid

    def is_leading(self) -> bool:
        return self.beat_pid() is not None and self.proc.poll() is None

    def sigterm(self) -> float:
        at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        return at

    def kill_with_beat(self) -> float:
        """kill -9 the elector and its beat at once, as a node failure would."""
        pid = self.beat_pid()
        at = time.time()
        self.proc.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.killed_at = at
        self.proc.wait(timeout=10)
        return at

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid = self.beat_pid()
        if pid is not None:  # never leave a beat behind, whatever the test did
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return self.proc.returncode


def standalone_elector(workdir: Path) -> Path:
    """The single-file elector alone in a directory, as the init container copies it into a pod."""
    target = workdir / "elector" / BUNDLE_FILE_NAME
    if not target.exists():
        bundle.build(target)
    return target


def admin_connection(kubeconfig: Path, server: str | None = None) -> list[str]:
    """Elector flags for the local cluster's admin credentials, resolved by the Kubernetes client
    (as `celery-fleet elect` does) into files: the elector itself reads no kubeconfig."""
    endpoint, _ = endpoint_from_kubeconfig(str(kubeconfig), None)
    flags = ["--server", server or endpoint.server]
    if endpoint.ca_file:
        flags += ["--ca-file", endpoint.ca_file]
    if endpoint.client_cert_file:
        flags += ["--client-cert", endpoint.client_cert_file]
    if endpoint.client_key_file:
        flags += ["--client-key", endpoint.client_key_file]
    return flags


def start_beat_elector(
    identity: str,
    *,
    workdir: Path,
    kubeconfig: Path,
    namespace: str,
    lease: str,
    broker_url: str,
    queue: str = "ticks",
    server: str | None = None,
    timings: Timings | None = None,
    extra_env: dict[str, str] | None = None,
    connection: list[str] | None = None,
) -> BeatElector:
    """`connection`: elector flags naming the apiserver and credentials (default: the admin's, at
    `server` when given, e.g. a proxy)."""
    timings = timings or Timings()
    elector = standalone_elector(workdir)
    log_path = workdir / f"{identity}.log"
    argv = [
        sys.executable, str(elector),
        *(connection if connection is not None else admin_connection(kubeconfig, server)),
        "--namespace", namespace, "--lease", lease, "--identity", identity,
        *timings.flags(),
        "--",
        sys.executable, "-m", "celery", "-A", "tests.support.beatapp", "beat",
        "--schedule", str(workdir / f"{identity}-schedule"), "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BEAT_BROKER_URL": broker_url,
        "BEAT_TICK_QUEUE": queue,
        "BEAT_SENDER": identity,
        **(extra_env or {}),
    }
    env.pop("KUBECONFIG", None)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
    return BeatElector(identity, proc, log_path)


def overlap_seconds(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
