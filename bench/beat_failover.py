"""Beat failover under the Lease elector: kill -9, graceful stop and network partition.

    .venv/bin/python bench/beat_failover.py [--trials 10] [--out bench/results/beat_failover.md]

Needs the local cluster (`make cluster-up`) and redis-server on PATH. Two electors, each
talking to the apiserver through its own TCP proxy, compete for one Lease and run
`celery beat` (tests/support/beatapp.py: one task per whole wall-clock second). Each trial
disrupts the current leader, waits for the standby to take over and for its ticks, then
restores a standby (a new elector after kill/stop, the healed one after a partition).

Measured per trial:
- failover: disruption (kill / SIGTERM / cut) -> the standby spawns beat (elector logs);
- fence: for stop and partition, old beat stopped -> new beat started (must be > 0);
- tick gap: last tick of the old beat -> first tick of the new (includes beat start-up);
- duplicate slots (a second sent twice: must be 0) and missed slots, from Redis.

    .venv/bin/python bench/beat_failover.py --slots --trials 2

With `--slots` the beats run the operator's default scheduler (LeaseScheduler: schedule state on
the Lease, `--schedule-state`) and tests/support/beat_slots_app.py with a crontab entry every
minute and an interval entry every 10 s. Each trial disrupts the leader 1.5 s before a whole
minute, so that minute falls inside the failover gap, and counts per slot: the minute sent once,
by whom and how late; the interval entry's first run under the new leader against its last under
the old (each message carries the `last_run_at` beat judged it against: a restarted countdown
shows as the new beat's own start there instead of the old leader's last run). The table goes into its own section of the results file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.beat_slots_app import ALIGNED_TASK, INTERVAL_TASK, read_sends  # noqa: E402
from tests.support.beat_state_rig import start_slots_elector  # noqa: E402
from tests.support.beatapp import (  # noqa: E402
    BeatElector,
    Tick,
    Timings,
    analyse_ticks,
    overlap_seconds,
    read_ticks,
    start_beat_elector,
)
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.tcp_proxy import TcpProxy  # noqa: E402

from celery_fleet.leader import endpoint_from_kubeconfig  # noqa: E402 (after the path set-up)

TIMINGS = Timings(duration=4, renew_deadline=3, retry_period=0.5)
DEFAULTS = Timings(duration=15, renew_deadline=10, retry_period=2)
LEASE = "beat"
SCENARIOS = ("kill", "graceful", "partition")


def wait(predicate: Callable[[], object], timeout: float, what: Callable[[], str] | str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


@dataclass
class Trial:
    scenario: str
    failover: float
    fence: float | None
    tick_gap: float
    beat_startup: float  # spawn of the new beat -> its first tick
    missed: int
    duplicates: int


SLOT_INTERVAL_SECONDS = 10.0
# How long before a whole minute the leader is disrupted: the minute then falls inside the gap.
DISRUPT_BEFORE_MINUTE = 1.5
SLOTS_SECTION = "## Shared schedule state: crontab every minute + interval every 10 s"
BASELINE_SECTION = "## Before: a schedule file per pod (PersistentScheduler), same trials"


@dataclass
class SlotTrial:
    scenario: str
    failover: float
    minute_sends: int  # sends of the minute inside the gap (must be 1)
    minute_sender: str  # "old" or "new"
    minute_late: float  # the minute's send after the whole minute
    interval_last_old_to_first_new: float
    interval_restarted: bool  # the new leader ignored the old countdown
    duplicates: int  # crontab minutes sent twice + interval runs closer than half the interval
    missed: int  # crontab minutes between the first and last send that nobody sent


@dataclass
class Bench:
    cluster: Cluster
    namespace: str
    redis: RedisServer
    workdir: Path
    apiserver: tuple[str, int]
    electors: list[BeatElector] = field(default_factory=list)
    broker: Any = None  # one redis.Redis for reading ticks
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    slots: bool = False  # LeaseScheduler + beat_slots_app instead of beatapp's one-second ticks
    baseline: bool = False  # with slots: PersistentScheduler, a file per pod, as before issue 29
    _serial: int = 0

    def spawn(self) -> BeatElector:
        self._serial += 1
        identity = f"beat-{self._serial}"
        proxy = TcpProxy(*self.apiserver).start()
        self.proxies[identity] = proxy
        if self.slots:
            elector = start_slots_elector(
                identity,
                workdir=self.workdir,
                kubeconfig=self.cluster.kubeconfig,
                namespace=self.namespace,
                lease=LEASE,
                broker_url=self.redis.url,
                server=proxy.url,
                timings=TIMINGS,
                extra_env={"SLOTS_CRONTAB": "1", "SLOTS_INTERVAL_SECONDS": f"{SLOT_INTERVAL_SECONDS:g}"},
                per_pod_file=self.baseline,
            )
            self.electors.append(elector)
            return elector
        elector = start_beat_elector(
            identity,
            workdir=self.workdir,
            kubeconfig=self.cluster.kubeconfig,
            namespace=self.namespace,
            lease=LEASE,
            broker_url=self.redis.url,
            server=proxy.url,
            timings=TIMINGS,
        )
        self.electors.append(elector)
        return elector

    def live(self) -> list[BeatElector]:
        return [e for e in self.electors if e.proc.poll() is None]

    def leader(self) -> BeatElector | None:
        leading = [e for e in self.live() if e.is_leading()]
        if len(leading) > 1:
            raise AssertionError(f"two beats at once: {[e.identity for e in leading]}")
        return leading[0] if leading else None

    def ticks(self) -> list[Tick]:
        if self.broker is None:
            self.broker = self.redis.client()
        return read_ticks(self.broker)

    def ticks_from(self, identity: str) -> int:
        if self.slots:
            return sum(x["sender"] == identity and x["task"] == INTERVAL_TASK for x in self.sends())
        return sum(t.sender == identity for t in self.ticks())

    def sends(self) -> list[dict[str, Any]]:
        if self.broker is None:
            self.broker = self.redis.client()
        return read_sends(self.broker)

    def describe(self) -> str:
        if self.slots:
            lines = [json.dumps(x) for x in self.sends()[-8:]]
            for e in self.electors[-3:]:
                lines.append(f"{e.identity}: {[(round(ev.at % 100, 2), ev.event) for ev in e.events()][-10:]}")
            return "\n".join(lines)
        lines = [analyse_ticks(self.ticks()).describe()]
        for e in self.electors[-3:]:
            lines.append(f"{e.identity}: {[(round(ev.at % 100, 2), ev.event) for ev in e.events()][-10:]}")
        return "\n".join(lines)

    def steady(self) -> tuple[BeatElector, BeatElector]:
        """Exactly one leader ticking and one standby that has read its lease."""
        wait(lambda: self.leader() is not None, 20, self.describe)
        leader = self.leader()
        assert leader is not None
        while len(self.live()) < 2:
            self.spawn()
        standby = next(e for e in self.live() if e is not leader)
        wait(
            lambda: any(
                ev.event == "observed-holder" and ev.fields.get("holder") == leader.identity for ev in standby.events()
            ),
            15,
            self.describe,
        )
        base = self.ticks_from(leader.identity)
        wait(lambda: self.ticks_from(leader.identity) >= base + 1, 2 * SLOT_INTERVAL_SECONDS + 5, self.describe)
        return leader, standby

    def trial(self, scenario: str) -> Trial:
        leader, standby = self.steady()
        if scenario == "kill":
            at = leader.kill_with_beat()
        elif scenario == "graceful":
            at = leader.sigterm()
        else:
            at = self.proxies[leader.identity].cut("blackhole")
        wait(lambda: self.leader() is standby, TIMINGS.duration + TIMINGS.retry_period + 15, self.describe)
        started = standby.times("cmd-started")[-1]
        fence = None
        if scenario != "kill":
            wait(lambda: leader.times("cmd-stopped"), 5, self.describe)
            fence = started - leader.times("cmd-stopped")[-1]
        base = self.ticks_from(standby.identity)
        wait(lambda: self.ticks_from(standby.identity) >= base + 2, 15, self.describe)

        ticks = self.ticks()
        last_old = max(t.published_at for t in ticks if t.sender == leader.identity)
        first_new = min(t.published_at for t in ticks if t.sender == standby.identity and t.published_at > last_old)
        missed = max(0, math.floor(first_new) - math.floor(last_old) - 1)
        window = [x.slot for x in ticks if at - 3 <= x.published_at]
        duplicates = len(window) - len(set(window))

        if scenario == "graceful":
            leader.proc.wait(timeout=10)
        elif scenario == "partition":
            self.proxies[leader.identity].restore()
            wait(lambda: leader.times("api-recovered"), 15, self.describe)
        return Trial(scenario, started - at, fence, first_new - last_old, first_new - started, missed, duplicates)

    def slot_trial(self, scenario: str) -> SlotTrial:
        leader, standby = self.steady()
        # Disrupt just before a whole minute: that minute's slot falls inside the failover gap.
        wait(lambda: 60 - time.time() % 60 <= DISRUPT_BEFORE_MINUTE + 0.5, 65, "the end of the minute")
        time.sleep(max(0.0, 60 - time.time() % 60 - DISRUPT_BEFORE_MINUTE))
        minute = (math.floor(time.time() / 60) + 1) * 60
        if scenario == "kill":
            at = leader.kill_with_beat()
        elif scenario == "graceful":
            at = leader.sigterm()
        else:
            at = self.proxies[leader.identity].cut("blackhole")
        wait(lambda: self.leader() is standby, TIMINGS.duration + TIMINGS.retry_period + 15, self.describe)
        started = standby.times("cmd-started")[-1]
        wait(
            lambda: (
                (self.baseline or any(x["slot"] == minute for x in self.sends()))
                and sum(
                    x["sender"] == standby.identity and x["task"] == INTERVAL_TASK and x["published_at"] > at
                    for x in self.sends()
                )
                >= 2
            ),
            2 * SLOT_INTERVAL_SECONDS + 15,
            self.describe,
        )
        sends = self.sends()
        of_minute = [x for x in sends if x["task"] == ALIGNED_TASK and x["slot"] == minute]
        intervals = [x for x in sends if x["task"] == INTERVAL_TASK]
        # An elector may lead more than once over the run (the healed one after a partition).
        last_old = max(
            (x for x in intervals if x["sender"] == leader.identity and x["published_at"] < started),
            key=lambda x: x["published_at"],
        )
        first_new = min(
            (x for x in intervals if x["sender"] == standby.identity and x["published_at"] > at),
            key=lambda x: x["published_at"],
        )
        # The new leader judged its first run against a last run: the old leader's (the countdown goes
        # on) or its own start (restarted). beat_slots_app stamps it on the message.
        restarted = abs(first_new["last_run_at"] - last_old["published_at"]) > 1.0
        if scenario == "graceful":
            leader.proc.wait(timeout=10)
        elif scenario == "partition":
            self.proxies[leader.identity].restore()
            wait(lambda: leader.times("api-recovered"), 15, self.describe)
        return SlotTrial(
            scenario,
            started - at,
            len(of_minute),
            "-" if not of_minute else ("new" if of_minute[0]["sender"] == standby.identity else "old"),
            (of_minute[0]["published_at"] - minute) if of_minute else float("nan"),
            first_new["published_at"] - last_old["published_at"],
            restarted,
            *slot_faults(sends),
        )

    def close(self) -> None:
        for e in self.electors:
            e.stop()
        for p in self.proxies.values():
            p.stop()
        if self.broker is not None:
            self.broker.close()


def slot_faults(sends: list[dict[str, Any]]) -> tuple[int, int]:
    """(duplicates, missed) over the whole run: minutes sent twice or never, interval runs twice."""
    minutes = [int(x["slot"]) for x in sends if x["task"] == ALIGNED_TASK]
    duplicates = len(minutes) - len(set(minutes))
    missed = len(set(range(min(minutes), max(minutes) + 60, 60)) - set(minutes)) if minutes else 0
    runs = sorted(x["published_at"] for x in sends if x["task"] == INTERVAL_TASK)
    duplicates += sum(1 for a, b in itertools.pairwise(runs) if b - a < SLOT_INTERVAL_SECONDS / 2)
    return duplicates, missed


def slots_report(
    trials: list[SlotTrial], elapsed: float, command: str, load: str, overlaps: float, baseline: bool
) -> str:
    t = TIMINGS
    scheduler = (
        "Celery's PersistentScheduler with a schedule file per pod (what a CeleryBeat ran before issue 29)"
        if baseline
        else "the CeleryBeat default scheduler, LeaseScheduler: each entry's last run on the Lease, "
        "recorded through the fence before the send (docs/beat.md)"
    )
    lines = [
        BASELINE_SECTION if baseline else SLOTS_SECTION,
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s (load average {load}). "
        f"The beats run {scheduler}. App: tests/support/beat_slots_app.py "
        f"with `crontab()` (every minute) and an interval of {SLOT_INTERVAL_SECONDS:g} s. Lease timings "
        f"{t.duration} / {t.renew_deadline:g} / {t.retry_period:g} s. Each trial disrupts the leader "
        f"{DISRUPT_BEFORE_MINUTE:g} s before a whole minute, so that minute falls inside the failover gap.",
        "",
        "| scenario | trial | failover | minute in the gap: sends | sent by | late by | interval: last old -> first new "
        "| countdown restarted | duplicates | missed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, x in enumerate(trials, 1):
        lines.append(
            f"| {x.scenario} | {n} | {x.failover:.2f} s | {x.minute_sends} | {x.minute_sender} | {x.minute_late:.2f} s "
            f"| {x.interval_last_old_to_first_new:.2f} s | {'yes' if x.interval_restarted else 'no'} "
            f"| {x.duplicates} | {x.missed} |"
        )
    last = trials[-1] if trials else None
    lines += [
        "",
        f"Over the whole run: duplicates **{last.duplicates if last else 0}**, gap minutes never sent "
        f"**{sum(x.minute_sends == 0 for x in trials)}**, other minutes missed (holes between sent minutes) "
        f"**{last.missed if last else 0}**, countdowns restarted **{sum(x.interval_restarted for x in trials)}**, "
        f"seconds with two beats **{overlaps:.3f}** (the duplicates/missed columns are cumulative).",
        "",
        "- *late by*: the minute's send after the whole minute: the failover, plus the new beat's start-up "
        "(interpreter, Celery, reading the Lease). After a partition the old leader cannot record (the "
        "apiserver is cut off) and so does not send; the new one sends the minute once.",
        "- *interval: last old -> first new*: on the old countdown, the first run of the new leader is due "
        f"{SLOT_INTERVAL_SECONDS:g} s after the old leader's last, or at once when that passed in the gap. "
        "Before this change (a schedule file per pod) it came a whole interval after the new beat started.",
        "- *countdown restarted*: the new leader judged its first interval run against its own start instead of "
        "the old leader's last run (beat_slots_app stamps the `last_run_at` beat used on each message).",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) one `## ` section of the results file, keeping the rest."""
    text = path.read_text() if path.exists() else ""
    if heading in text:
        before, after = text.split(heading, 1)
        rest = after.split("\n## ", 1)
        tail = "\n## " + rest[1] if len(rest) > 1 else ""
        path.write_text(before + section + tail)
    else:
        path.write_text(text.rstrip("\n") + ("\n\n" if text else "") + section)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(trials: list[Trial], duplicates: list[int], overlaps: float, elapsed: float, command: str, load: str) -> str:
    t = TIMINGS
    d = DEFAULTS
    lines = [
        "# Celery Beat failover under the Lease elector",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s "
        f"(local kwok control plane, real Redis, real `celery beat`; 2 cores shared with other work, load "
        f"average {load}).",
        "",
        f"Lease timings: duration {t.duration} s, renew deadline {t.renew_deadline:g} s, "
        f"retry period {t.retry_period:g} s (stop grace {(t.duration - t.renew_deadline) / 2:g} s).",
        "Each elector reaches the apiserver through its own TCP proxy; a partition black-holes the "
        "leader's proxy (bytes dropped both ways, requests hang until the elector's own timeouts).",
        "",
        "| scenario | trials | failover p50 | failover max | bound | old stop -> new start (min) "
        "| beat start-up p50 | tick gap p50 | tick gap max | missed slots | duplicate slots |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bounds = {
        "kill": f"D+R = {t.duration + t.retry_period:g} s",
        "graceful": f"~R = {t.retry_period:g} s",
        "partition": f"D+R = {t.duration + t.retry_period:g} s",
    }
    for scenario in SCENARIOS:
        rows = [x for x in trials if x.scenario == scenario]
        if not rows:
            continue
        failovers = [x.failover for x in rows]
        gaps = [x.tick_gap for x in rows]
        fences = [x.fence for x in rows if x.fence is not None]
        fence = f"{min(fences):.2f} s" if fences else "n/a (old beat killed)"
        lines.append(
            f"| {scenario} | {len(rows)} | {statistics.median(failovers):.2f} s | {max(failovers):.2f} s "
            f"| {bounds[scenario]} | {fence} | {statistics.median(x.beat_startup for x in rows):.2f} s "
            f"| {statistics.median(gaps):.2f} s | {max(gaps):.2f} s "
            f"| {sum(x.missed for x in rows)} | {sum(x.duplicates for x in rows)} |"
        )
    lines += [
        "",
        f"Duplicate slots over the whole run (a wall-clock second sent twice): **{len(duplicates)}**"
        + (f" {duplicates}" if duplicates else ""),
        f"Seconds during which two beats ran at once (from the electors' start/stop log lines): **{overlaps:.3f}**",
        "",
        "- *failover*: from the disruption (kill -9 of elector and beat / SIGTERM to the elector / cut) to the "
        "standby spawning `celery beat`. The bounds leave out apiserver round trips and process scheduling, "
        "which a loaded machine stretches by a few hundred ms.",
        "- *old stop -> new start*: the fence. For a partition it must be positive: the cut-off leader stops beat "
        "at its renew deadline, before anyone may take the lease over.",
        "- *tick gap*: last tick of the old beat to the first tick of the new one. It adds `celery beat` "
        "start-up (interpreter, Celery import, broker connection: the *beat start-up* column) and the wait for "
        "the next whole second to the failover; *missed slots* are the whole seconds inside those gaps that "
        "nobody sent. A hot standby could pre-start Celery to cut this, at the cost of fencing a process "
        "that is already connected to the broker.",
        "",
        "## What the defaults (15 / 10 / 2) imply",
        "",
        "The same mechanics, with D = lease duration, RD = renew deadline, R = retry period:",
        "",
        f"- kill: the standby takes over D after it last saw the record change, and it sees a change at most R "
        f"late: failover in [D - R, D + R] = [{d.duration - d.retry_period:g}, {d.duration + d.retry_period:g}] s "
        f"(measured here with D={t.duration}: [{t.duration - t.retry_period:g}, {t.duration + t.retry_period:g}] s).",
        f"- graceful stop: the leader stops beat, then releases (holder cleared, duration 1 s); the standby "
        f"acquires at its next poll: <= R + beat stop time = about {d.retry_period:g} s.",
        f"- partition: the leader stops beat at most RD = {d.renew_deadline:g} s after its last successful "
        f"renewal; the standby starts it in [D - R, D + R] = [{d.duration - d.retry_period:g}, "
        f"{d.duration + d.retry_period:g}] s after the cut; the fence margin is at least "
        f"D - RD - stop grace = {d.duration - d.renew_deadline - (d.duration - d.renew_deadline) / 2:g} s.",
        "",
        "For comparison, redbeat (Redis-lock scheduler) fails over when its lock expires: "
        "`redbeat_lock_timeout` defaults to 5 x `beat_max_loop_interval` = 5 x 300 s = **25 minutes** after a "
        "leader dies without releasing: about 88 times the worst-case kill failover (17 s) of the default Lease timings.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per scenario (default 10)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "beat_failover.md")
    parser.add_argument(
        "--slots", action="store_true", help="LeaseScheduler with crontab every minute + interval 10 s (see above)"
    )
    parser.add_argument("--baseline", action="store_true", help="with --slots: a schedule file per pod instead")
    args = parser.parse_args(argv)
    command = "python bench/beat_failover.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")

    cluster = Cluster(kubeconfig=ROOT / ".local" / "kubeconfig", bin_dir=ROOT / ".local" / "bin")
    if not cluster.kubeconfig.exists():
        print("no local cluster: run `make cluster-up` first", file=sys.stderr)
        return 2
    server = endpoint_from_kubeconfig(str(cluster.kubeconfig), None)[0].server
    host, port = server.removeprefix("https://").rsplit(":", 1)
    namespace = f"bench-beat-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    began = time.monotonic()
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="beat-bench-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        redis.start()
        bench = Bench(
            cluster, namespace, redis, workdir, (host.strip("[]"), int(port)), slots=args.slots, baseline=args.baseline
        )
        try:
            bench.spawn()
            bench.spawn()
            if args.slots:
                return run_slots(bench, scenarios, args, command, began, load_before)
            for scenario in scenarios:
                for n in range(args.trials):
                    trial = bench.trial(scenario)
                    trials.append(trial)
                    print(
                        f"{scenario:9} #{n + 1:2}: failover {trial.failover:5.2f} s  "
                        f"fence {'-' if trial.fence is None else f'{trial.fence:5.2f} s'}  "
                        f"tick gap {trial.tick_gap:5.2f} s  beat start-up {trial.beat_startup:5.2f} s  "
                        f"missed {trial.missed}  duplicates {trial.duplicates}",
                        flush=True,
                    )
            now = time.time()
            intervals = [e.running_intervals(now) for e in bench.electors]
            overlaps = sum(
                overlap_seconds(intervals[i], intervals[j])
                for i in range(len(intervals))
                for j in range(i + 1, len(intervals))
            )
            duplicates = analyse_ticks(bench.ticks()).duplicates
            load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        finally:
            bench.close()
            redis.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    text = report(trials, duplicates, overlaps, time.monotonic() - began, command, f"{load_before} -> {load}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    (args.out.with_suffix(".json")).write_text(json.dumps([t.__dict__ for t in trials], indent=1))
    return 1 if duplicates or overlaps > 0 else 0


def run_slots(
    bench: Bench, scenarios: list[str], args: argparse.Namespace, command: str, began: float, load_before: str
) -> int:
    trials: list[SlotTrial] = []
    for scenario in scenarios:
        for n in range(args.trials):
            x = bench.slot_trial(scenario)
            trials.append(x)
            print(
                f"{scenario:9} #{n + 1}: failover {x.failover:5.2f} s  minute sends {x.minute_sends} by {x.minute_sender} "
                f"late {x.minute_late:5.2f} s  interval old->new {x.interval_last_old_to_first_new:5.2f} s  "
                f"restarted {x.interval_restarted}  duplicates {x.duplicates}  missed {x.missed}",
                flush=True,
            )
    now = time.time()
    intervals = [e.running_intervals(now) for e in bench.electors]
    overlaps = sum(
        overlap_seconds(intervals[i], intervals[j]) for i in range(len(intervals)) for j in range(i + 1, len(intervals))
    )
    load = f"{load_before} -> " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    section = slots_report(trials, time.monotonic() - began, command, load, overlaps, args.baseline)
    write_section(args.out, BASELINE_SECTION if args.baseline else SLOTS_SECTION, section)
    print(section)
    bad = any(x.minute_sends != 1 or x.interval_restarted or x.duplicates or x.missed for x in trials)
    return 1 if bad or overlaps > 0 else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
