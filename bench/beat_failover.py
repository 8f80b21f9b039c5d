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
"""

from __future__ import annotations

import argparse
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
    _serial: int = 0

    def spawn(self) -> BeatElector:
        self._serial += 1
        identity = f"beat-{self._serial}"
        proxy = TcpProxy(*self.apiserver).start()
        self.proxies[identity] = proxy
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
        return sum(t.sender == identity for t in self.ticks())

    def describe(self) -> str:
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
        wait(lambda: self.ticks_from(leader.identity) >= base + 1, 10, self.describe)
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

    def close(self) -> None:
        for e in self.electors:
            e.stop()
        for p in self.proxies.values():
            p.stop()
        if self.broker is not None:
            self.broker.close()


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
        bench = Bench(cluster, namespace, redis, workdir, (host.strip("[]"), int(port)))
        try:
            bench.spawn()
            bench.spawn()
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
