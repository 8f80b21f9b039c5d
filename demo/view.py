"""The demo's terminal view: tiers, queue depth, in-flight, workers, the beat leader, scaling Events.

    python demo/view.py ready --namespace NS            # wait for every tier's minimum and a beat leader
    python demo/view.py watch --namespace NS --broker URL --expect high_priority=360 ...

`watch` redraws in place every second until the burst is done and every tier is back at its
minimum (or --timeout), then prints a summary (tasks done, p50/p95 wait per tier, peak replicas,
worker-seconds, beat ticks and failover) and writes it as JSON with --summary.

Everything shown is read from where it lives: queue depth and in-flight from Redis (kombu's
lists and its `unacked` hash), replicas from the tier Deployments (ready = the pods the local
runtime reports as connected to the broker), the leader from the Lease, and Events from the API.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis
from kubernetes import client, config

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
STEPS = (0, 3, 6, 9)
SHOWN_EVENTS = ("ScaledUp", "ScaledDown", "LeaderElected", "LeaderLost", "BrokerUnreachable")

BOLD, DIM, GREEN, YELLOW, RESET = "\x1b[1m", "\x1b[2m", "\x1b[32m", "\x1b[33m", "\x1b[0m"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


@dataclass
class TierSample:
    name: str
    queues: list[str]
    minimum: int
    maximum: int
    replicas: int = 0
    ready: int = 0
    desired: int = 0
    queued: int = 0
    in_flight: int = 0


@dataclass
class Run:
    """What the watch accumulates for the summary."""

    started: float
    tiers: dict[str, TierSample] = field(default_factory=dict)
    peak: Counter[str] = field(default_factory=Counter)
    worker_seconds: Counter[str] = field(default_factory=Counter)
    leaders: list[tuple[float, str]] = field(default_factory=list)
    failover_deleted: tuple[float, str] | None = None
    failover_seconds: float | None = None
    last_sample: float | None = None


class Cluster:
    def __init__(self, kubeconfig: str | None, namespace: str, pool: str, beat: str) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self.namespace, self.pool, self.beat = namespace, pool, beat

    def pool_object(self) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "celeryworkerpools", self.pool)
        )

    def deployments(self) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(self.namespace, label_selector=f"{GROUP}/pool={self.pool}").items
        return {d.metadata.name: d for d in items}

    def running_workers(self) -> Counter[str]:
        """Pods per tier whose worker process the local runtime reports as connected to the broker
        (kwok alone would call every pod Ready at once)."""
        counts: Counter[str] = Counter()
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{GROUP}/pool={self.pool}").items
        for pod in pods:
            ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
            if ready is not None and ready.status == "True" and ready.reason == "LocalProcessReady":
                counts[pod.metadata.labels.get(f"{GROUP}/tier", "")] += 1
        return counts

    def leader(self) -> str | None:
        try:
            lease = self.coordination.read_namespaced_lease(f"{self.beat}-beat", self.namespace)
        except client.ApiException:
            return None
        return lease.spec.holder_identity or None

    def beat_pods(self) -> list[str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{GROUP}/beat={self.beat}").items
        return sorted(p.metadata.name for p in pods if not p.metadata.deletion_timestamp)

    def events(self) -> list[tuple[dt.datetime, str, str]]:
        out = []
        for e in self.core.list_namespaced_event(self.namespace).items:
            if e.reason not in SHOWN_EVENTS:
                continue
            when = e.last_timestamp or e.event_time or e.metadata.creation_timestamp
            out.append((when, e.reason, e.message or ""))
        return sorted(out, key=lambda x: x[0])

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace)


class Broker:
    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self._done_read = 0
        self.done: list[dict[str, Any]] = []

    def queued(self, queue: str) -> int:
        pipe = self.redis.pipeline()
        for step in STEPS:
            pipe.llen(queue if step == 0 else f"{queue}{SEP}{step}")
        return int(sum(pipe.execute()))

    def in_flight(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for raw in self.redis.hvals("unacked"):
            try:
                counts[str(json.loads(raw)[2])] += 1
            except (ValueError, IndexError, TypeError):
                continue
        return counts

    def read_done(self) -> list[dict[str, Any]]:
        new = self.redis.lrange("demo:done", self._done_read, -1)
        self._done_read += len(new)
        self.done += [json.loads(r) for r in new]
        return self.done

    def ticks(self) -> list[float]:
        return [float(json.loads(r)["at"]) for r in self.redis.lrange("demo:ticks", 0, -1)]


def sample(cluster: Cluster, broker: Broker, run: Run) -> dict[str, Any]:
    pool = cluster.pool_object()
    deployments = cluster.deployments()
    status_tiers = {t["name"]: t for t in (pool.get("status") or {}).get("tiers") or []}
    in_flight = broker.in_flight()
    now = time.time()
    elapsed = now - run.last_sample if run.last_sample is not None else 0.0
    run.last_sample = now
    for tier in pool["spec"]["tiers"]:
        name = tier["name"]
        s = run.tiers.setdefault(
            name, TierSample(name, list(tier["queues"]), tier["replicas"]["min"], tier["replicas"]["max"])
        )
        dep = deployments.get(f"{cluster.pool}-{name}")
        s.replicas = int(dep.spec.replicas or 0) if dep else 0
        s.ready = int(dep.status.ready_replicas or 0) if dep else 0
        s.desired = int(status_tiers.get(name, {}).get("desiredReplicas", s.replicas))
        s.queued = sum(broker.queued(q) for q in s.queues)
        s.in_flight = sum(in_flight.get(q, 0) for q in s.queues)
        run.peak[name] = max(run.peak[name], s.replicas)
        run.worker_seconds[name] += s.ready * elapsed
    leader = cluster.leader()
    if leader and (not run.leaders or run.leaders[-1][1] != leader):
        run.leaders.append((now, leader))
        if run.failover_deleted and run.failover_seconds is None and leader != run.failover_deleted[1]:
            run.failover_seconds = now - run.failover_deleted[0]
    return {"pool": pool, "leader": leader}


def bar(ready: int, replicas: int, maximum: int) -> str:
    starting = max(0, replicas - ready)
    room = max(0, maximum - max(ready, replicas))
    return f"{GREEN}{'■' * ready}{RESET}{YELLOW}{'□' * starting}{RESET}{DIM}{'·' * room}{RESET}"


def frame(run: Run, cluster: Cluster, broker: Broker, leader: str | None, expect: dict[str, int],
          budget: int | None) -> list[str]:  # fmt: skip
    width = shutil.get_terminal_size((120, 40)).columns
    elapsed = time.time() - run.started
    done_by_queue = Counter(r.get("queue") for r in broker.done)
    lines = [
        f"{BOLD}celery-fleet demo{RESET}  namespace {cluster.namespace}  "
        f"{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d} since the burst   {DIM}(Ctrl-C ends it early){RESET}",
        "",
        f"{BOLD}{'TIER':<8}{'QUEUE':<17}{'QUEUED':>7}{'IN-FLIGHT':>10}{'DONE':>10}   "
        f"WORKERS ready/replicas (max){RESET}",
    ]
    for s in run.tiers.values():
        queue = ",".join(s.queues)
        done = sum(done_by_queue.get(q, 0) for q in s.queues)
        expected = sum(expect.get(q, 0) for q in s.queues)
        done_text = f"{done}/{expected}" if expected else str(done)
        lines.append(
            f"{s.name:<8}{queue:<17}{s.queued:>7}{s.in_flight:>10}{done_text:>10}   "
            f"{bar(s.ready, s.replicas, s.maximum)}  {s.ready}/{s.replicas} ({s.maximum})"
        )
    total = sum(s.replicas for s in run.tiers.values())
    budget_text = f"; pool budget {total} of maxTotalReplicas {budget} in use" if budget is not None else ""
    lines.append(
        f"{DIM}{'':<8}{GREEN}■{RESET}{DIM} real celery worker, connected to Redis   {YELLOW}□{RESET}{DIM} starting"
        f"   · room up to max{budget_text}{RESET}"
    )
    lines.append("")
    pods = cluster.beat_pods()
    standby = [p for p in pods if p != leader]
    ticks = broker.ticks()
    leader_text = leader or f"{YELLOW}none{RESET}"
    lines.append(
        f"{BOLD}beat{RESET}    leader {leader_text}   standby {', '.join(standby) or '-'}   ticks {len(ticks)}"
    )
    if run.failover_deleted:
        took = (
            f"new leader after {run.failover_seconds:.1f}s"
            if run.failover_seconds is not None
            else "waiting for a new leader"
        )
        lines.append(f"{DIM}        demo deleted the leader pod {run.failover_deleted[1]}: {took}{RESET}")
    lines += ["", f"{BOLD}recent events{RESET}"]
    start = dt.datetime.fromtimestamp(run.started, dt.UTC)
    for when, reason, message in cluster.events()[-7:]:
        # Event times have whole seconds: one stamped in the burst's second reads +00:00.
        offset = round((when - start).total_seconds())
        stamp = f"{'+' if offset >= 0 else '-'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
        lines.append(f"  {stamp}  {reason:<14}{message}"[: width - 1])
    return lines


def draw(lines: list[str], first: bool) -> None:
    out = ("\x1b[2J" if first else "") + "\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"
    sys.stdout.write(out)
    sys.stdout.flush()


def settled(run: Run, broker: Broker, expect: dict[str, int]) -> bool:
    done = Counter(r.get("queue") for r in broker.done)
    if any(done.get(q, 0) < n for q, n in expect.items()):
        return False
    return all(s.replicas == s.minimum and s.ready == s.replicas and s.queued == 0 for s in run.tiers.values())


def summarize(run: Run, broker: Broker, expect: dict[str, int], ended: float) -> dict[str, Any]:
    broker.read_done()
    tier_of = {q: s.name for s in run.tiers.values() for q in s.queues}
    waits: dict[str, list[float]] = defaultdict(list)
    done: Counter[str] = Counter()
    for r in broker.done:
        tier = tier_of.get(r.get("queue"))
        if tier is None:
            continue
        done[tier] += 1
        # Beat's ticks carry no send time; only the burst's tasks have a wait.
        if r.get("sent") is not None:
            waits[tier].append(float(r["started"]) - float(r["sent"]))
    ticks = [t for t in broker.ticks() if t >= run.started]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    tiers = {}
    for s in run.tiers.values():
        tiers[s.name] = {
            "tasks_done": done[s.name],
            "tasks_expected": sum(expect.get(q, 0) for q in s.queues),
            "wait_p50_s": round(percentile(waits[s.name], 50), 2) if waits[s.name] else None,
            "wait_p95_s": round(percentile(waits[s.name], 95), 2) if waits[s.name] else None,
            "peak_replicas": run.peak[s.name],
            "worker_seconds": round(run.worker_seconds[s.name], 1),
        }
    return {
        "seconds": round(ended - run.started, 1),
        "tiers": tiers,
        "worker_seconds": round(sum(run.worker_seconds.values()), 1),
        "beat": {
            "ticks": len(ticks),
            "min_gap_s": round(min(gaps), 2) if gaps else None,
            "leaders": [name for _, name in run.leaders],
            "failover_s": round(run.failover_seconds, 1) if run.failover_seconds is not None else None,
        },
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(
        f"\n{BOLD}Summary{RESET} ({summary['seconds']:.0f} s from the burst until every tier was back at its minimum)"
    )
    print(f"  {'tier':<8}{'tasks done':>12}{'wait p50':>10}{'wait p95':>10}{'peak replicas':>15}{'worker-seconds':>16}")
    for name, t in summary["tiers"].items():
        done = f"{t['tasks_done']}/{t['tasks_expected']}" if t["tasks_expected"] else str(t["tasks_done"])
        p50 = f"{t['wait_p50_s']:.1f} s" if t["wait_p50_s"] is not None else "-"
        p95 = f"{t['wait_p95_s']:.1f} s" if t["wait_p95_s"] is not None else "-"
        print(f"  {name:<8}{done:>12}{p50:>10}{p95:>10}{t['peak_replicas']:>15}{t['worker_seconds']:>16.0f}")
    print(f"  {'total':<8}{'':>47}{summary['worker_seconds']:>16.0f}")
    beat = summary["beat"]
    failover = f"; failover {beat['failover_s']:.1f} s after the leader pod was deleted" if beat["failover_s"] else ""
    gap = f", never two within {beat['min_gap_s']:.1f} s" if beat["min_gap_s"] is not None else ""
    print(f"  beat: {beat['ticks']} ticks (one per 5 s){gap}; leaders {' -> '.join(beat['leaders']) or '-'}{failover}")
    print(f"  {DIM}(medium runs the beat's ticks; wait = task start - apply_async time, from Redis records){RESET}")


def parse_expect(items: list[str]) -> dict[str, int]:
    expect = {}
    for item in items:
        queue, _, count = item.partition("=")
        expect[queue] = int(count)
    return expect


def cmd_ready(args: argparse.Namespace) -> int:
    cluster = Cluster(args.kubeconfig, args.namespace, args.pool, args.beat)
    deadline = time.monotonic() + args.timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            pool = cluster.pool_object()
            running = cluster.running_workers()
            states = [(t["name"], running[t["name"]], t["replicas"]["min"]) for t in pool["spec"]["tiers"]]
            leader = cluster.leader()
        except client.ApiException:
            time.sleep(0.5)
            continue
        text = ", ".join(f"{n} {r}/{m}" for n, r, m in states) + f"; beat leader {leader or '-'}"
        if text != last:
            print(f"  workers ready: {text}", flush=True)
            last = text
        if all(r >= m for _, r, m in states) and leader:
            return 0
        time.sleep(0.5)
    print(f"timed out after {args.timeout:.0f}s waiting for the workers and the beat leader", file=sys.stderr)
    return 1


def cmd_watch(args: argparse.Namespace) -> int:
    cluster = Cluster(args.kubeconfig, args.namespace, args.pool, args.beat)
    broker = Broker(args.broker)
    expect = parse_expect(args.expect)
    run = Run(started=args.since or time.time())
    tty = sys.stdout.isatty()
    first = True
    last_line = 0.0
    try:
        while True:
            tick = time.monotonic()
            try:
                state = sample(cluster, broker, run)
                broker.read_done()
            except (client.ApiException, redis.RedisError) as exc:
                print(f"(read failed: {exc}; retrying)", file=sys.stderr)
                time.sleep(1)
                continue
            elapsed = time.time() - run.started
            if args.failover_at is not None and run.failover_deleted is None and elapsed >= args.failover_at:
                leader = state["leader"]
                if leader:
                    cluster.delete_pod(leader)
                    run.failover_deleted = (time.time(), leader)
            if tty:
                budget = state["pool"]["spec"].get("maxTotalReplicas")
                draw(frame(run, cluster, broker, state["leader"], expect, budget), first)
                first = False
            elif time.monotonic() - last_line >= 5:
                last_line = time.monotonic()
                parts = [f"{s.name} q={s.queued} run={s.in_flight} {s.ready}/{s.replicas}" for s in run.tiers.values()]
                print(f"+{elapsed:5.1f}s  " + "  ".join(parts) + f"  leader={state['leader']}", flush=True)
            failover_done = args.failover_at is None or run.failover_seconds is not None
            if elapsed >= args.min_seconds and failover_done and settled(run, broker, expect):
                break
            if elapsed >= args.timeout:
                print(f"\n(stopped after {args.timeout:.0f}s without settling)")
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    except KeyboardInterrupt:
        print("\n(interrupted)")
    summary = summarize(run, broker, expect, time.time())
    print_summary(summary)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("ready", "watch"):
        p = sub.add_parser(name)
        p.add_argument("--kubeconfig")
        p.add_argument("--namespace", required=True)
        p.add_argument("--pool", default="demo")
        p.add_argument("--beat", default="demo")
        p.add_argument("--timeout", type=float, default=150.0)
    watch = sub.choices["watch"]
    watch.add_argument("--broker", required=True)
    watch.add_argument("--expect", action="append", default=[], metavar="QUEUE=COUNT")
    watch.add_argument("--since", type=float, help="unix time of the burst (default: now)")
    watch.add_argument("--min-seconds", type=float, default=20.0)
    watch.add_argument("--failover-at", type=float, help="delete the beat leader's pod this many seconds in")
    watch.add_argument("--summary", help="write the summary as JSON here")
    args = parser.parse_args(argv)
    return cmd_ready(args) if args.command == "ready" else cmd_watch(args)


if __name__ == "__main__":
    sys.exit(main())
