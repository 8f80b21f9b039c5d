"""Fleet scale (issue 15): the operator's cost on top of the cluster's own floor, at N pools x 3 tiers.

    .venv/bin/python bench/fleet_scale.py --pools 200
    .venv/bin/python bench/fleet_scale.py --pools 1000 --storm 100
    .venv/bin/python bench/fleet_scale.py --pools 1000 --no-floor --memory-profile   # where memory goes

One run, two legs back to back on the same cluster:
1. the floor: the very Deployments the operator would write (rendered by its own builders, without
   an owner) applied with kubectl, no operator running, until every pod is Ready; then deleted;
2. the operator: the pools applied the same way, until every tier's pods are Ready and every pool
   says Ready.
The ratio of the two is the figure to read: absolute times on a shared 2-core machine are noisy.
Then: idle CPU (own CPU time from /proc, not wall-clock share), RSS, requests by verb and resource,
and a storm. Each tier runs min 1 replica (3 kwok pods per pool) so 1000 pools fit the local cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from _harness import (
    ROOT,
    Cluster,
    OperatorProcess,
    RedisServer,
    cluster_with_crds,
    kubectl_apply_many,
    proc_usage,
    wait_for,
    write_result,
)
from kubernetes import client, config, watch
from redis import exceptions as redis_errors

from celery_fleet.api.models import parse_pool
from celery_fleet.planning.workload import pool_children, tier_child_name

TIERS = ("high", "medium", "low")
OPERATOR_KUBE_THREADS = 20  # the operator's kube threads with --workers 8 (handlers/fleet.py: 2 x workers + 4)


def pool(i: int, broker: str) -> dict[str, Any]:
    return {
        "apiVersion": "celeryfleet.io/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": f"p{i:04d}"},
        "spec": {
            "app": "bench:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": {"url": broker},
            "tiers": [
                {"name": t, "queues": [f"p{i:04d}_{t}"], "concurrency": 2, "replicas": {"min": 1, "max": 4},
                 "autoscaling": {"targetDepthPerReplica": 10}}
                for t in TIERS
            ],
        },
    }  # fmt: skip


def floor_children(obj: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """What the operator writes for this pool (its own builders, replicas.min), minus the owner."""
    spec = parse_pool(obj)
    replicas = {t.name: t.replicas.min for t in spec.tiers}
    children = pool_children(obj["metadata"]["name"], namespace, "00000000-0000-0000-0000-000000000000", spec, replicas)
    for child in children:
        child["metadata"].pop("ownerReferences", None)  # no pool: the GC would delete an orphan's children
    return children


CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def control_plane_cpu() -> dict[str, float]:
    """CPU seconds so far of each control-plane process (kwokctl's binary runtime runs them here)."""
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            if exe in CONTROL_PLANE:
                out[exe] = out.get(exe, 0.0) + proc_usage(int(pid))[1]
        except OSError:
            continue
    return out


def cpu_row(before: dict[str, float], after: dict[str, float], extra: str = "") -> str:
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in CONTROL_PLANE}
    return (f"{sum(used.values()):.0f} s: kube-apiserver {used['kube-apiserver']:.0f}, etcd {used['etcd']:.0f}, "
            f"controller-manager {used['kube-controller-manager']:.0f}, scheduler {used['kube-scheduler']:.0f}, "
            f"kwok {used['kwok']:.0f}{extra}")  # fmt: skip


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class Sampler(threading.Thread):
    """Peak RSS of the operator while the phase runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.5):
            try:
                self.peak = max(self.peak, proc_usage(self.pid)[0])
            except OSError:
                return


class Until(threading.Thread):
    """Watches a collection until `count(done)` objects satisfy `ok`; records when that happened.

    A watch, not a list loop: listing thousands of Deployments every second would load the apiserver
    (and this machine) more than what is being measured.
    """

    def __init__(self, list_fn: Callable[..., Any], namespace: str, ok: Callable[[Any], bool], want: int) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.namespace, self.ok, self.want = list_fn, namespace, ok, want
        self.done: set[str] = set()
        self.first_at: dict[str, float] = {}  # when each object first satisfied `ok`
        self.seen: set[str] = set()  # every object that exists, in any state
        self.all_seen_at: float | None = None  # when `want` of them first existed (e.g. created by the operator)
        self.finished_at: float | None = None
        self.watching = False
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set() and self.finished_at is None:
            # (Re-)list, then watch from that list's revision; a watch that ends or expires lists again.
            listing = self.list_fn(self.namespace)
            self._saw(o["metadata"]["name"] for o in listing["items"])  # a re-list: they exist by now
            self.done = {o["metadata"]["name"] for o in listing["items"] if self.ok(o)}
            self._check()
            self.watching = True
            w = watch.Watch()
            try:
                for ev in w.stream(self.list_fn, self.namespace, resource_version=listing["metadata"]["resourceVersion"],
                                   timeout_seconds=60):  # fmt: skip
                    obj = ev["object"]
                    if ev["type"] == "ADDED":
                        self._saw([obj["metadata"]["name"]])
                    if ev["type"] != "DELETED" and self.ok(obj):
                        self.done.add(obj["metadata"]["name"])
                        self.first_at.setdefault(obj["metadata"]["name"], time.monotonic())
                    else:
                        self.done.discard(obj["metadata"]["name"])
                    if self._check() or self.stop_flag.is_set():
                        w.stop()
            except client.ApiException as err:
                if err.status != 410:  # expired resourceVersion: list and watch again
                    raise

    def _saw(self, names: Iterable[str]) -> None:
        self.seen.update(names)
        if self.all_seen_at is None and len(self.seen) >= self.want:
            self.all_seen_at = time.monotonic()

    def _check(self) -> bool:
        if self.finished_at is None and len(self.done) >= self.want:
            self.finished_at = time.monotonic()
        return self.finished_at is not None

    def wait(self, timeout: float, what: str) -> float:
        wait_for(lambda: self.finished_at is not None, timeout=timeout, interval=0.5,
                 message=lambda: f"{what}: {len(self.done)} of {self.want}")  # fmt: skip
        assert self.finished_at is not None
        return self.finished_at


def deployments_of(custom: client.CustomObjectsApi, selector: str = "") -> Callable[..., Any]:
    """List/watch Deployments as plain dicts: the client's models cost the watcher ~5 ms an event."""

    def list_fn(namespace: str, **kw: Any) -> Any:
        return custom.list_namespaced_custom_object(
            "apps", "v1", namespace, "deployments", label_selector=selector, **kw
        )

    return list_fn


def pools_of(custom: client.CustomObjectsApi) -> Callable[..., Any]:
    def list_fn(namespace: str, **kw: Any) -> Any:
        return custom.list_namespaced_custom_object("celeryfleet.io", "v1alpha1", namespace, "celeryworkerpools", **kw)

    return list_fn


def deployment_ready(d: dict[str, Any]) -> bool:
    replicas, status = (d.get("spec") or {}).get("replicas", 1), d.get("status") or {}
    return bool(status.get("readyReplicas", 0) >= replicas and status.get("updatedReplicas", 0) >= replicas)


def invalid(p: dict[str, Any]) -> str | None:
    """A pool the operator calls InvalidSpec: on this shared cluster, another branch's CRD (see main)."""
    for c in (p.get("status") or {}).get("conditions", []):
        if c.get("type") == "Ready" and c.get("reason") == "InvalidSpec":
            return str(c.get("message"))
    return None


def pool_ready(p: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (p.get("status") or {}).get("conditions", [])
    )


def apply_parallel(cluster: Cluster, ns: str, objs: list[dict[str, Any]], per_request: int) -> float:
    """Apply in chunks from threads, as a GitOps sync of many files would."""
    t0 = time.monotonic()
    chunks = [objs[i : i + per_request] for i in range(0, len(objs), per_request)]
    threads = [threading.Thread(target=kubectl_apply_many, args=(cluster, ns, c)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def fresh_namespace(cluster: Cluster, ns: str) -> None:
    delete_namespace(cluster, ns)
    cluster.kubectl("create", "ns", ns)


def delete_namespace(cluster: Cluster, ns: str) -> None:
    if cluster.kubectl("get", "ns", ns, check=False).returncode == 0:
        cluster.kubectl("delete", "ns", ns, "--wait=true", timeout=900)


def requests_by(op: OperatorProcess) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in op.metrics().splitlines():
        m = re.match(r'celery_fleet_kube_api_requests\{resource="([^"]*)",verb="([^"]*)"\} (\S+)', line)
        if m:
            out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


def reconciles(op: OperatorProcess) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
               if line.startswith('celery_fleet_reconciles_total{kind="CeleryWorkerPool"'))  # fmt: skip


def delta(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def per(d: dict[tuple[str, str], float], n: int) -> str:
    return ", ".join(f"{verb} {res} {v / n:.2f}" for (verb, res), v in sorted(d.items(), key=lambda kv: -kv[1]))


class TracedOperator(OperatorProcess):
    """The operator with a memory hook (bench/_traced_operator.py); `profile()` asks it where memory goes."""

    def __init__(self, cluster: Cluster, namespaces: list[str], workdir: Path, *extra: str) -> None:
        super().__init__(cluster.kubeconfig, namespaces, workdir / "operator.log", "--log-level", "WARNING", *extra,
                         command=[sys.executable, str(ROOT / "bench" / "_traced_operator.py")])  # fmt: skip
        self.out = workdir / "trace"
        self.dumps = 0
        os.environ["FLEET_TRACE_OUT"] = str(self.out)  # inherited by the child at start()

    def profile(self) -> dict[str, Any]:
        """The structures' sizes now (and tracemalloc's view with FLEET_TRACE_MALLOC=1)."""
        assert self.proc is not None
        self.dumps += 1
        path = Path(f"{self.out}-{self.dumps}.json")
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(path.exists, timeout=600, interval=1.0, message=f"{path}")
        return dict(json.loads(path.read_text()))


def memory_table(profiles: list[tuple[str, float, dict[str, Any]]]) -> str:
    """Deep sizes of the operator's structures at each point (label, RSS MiB, profile)."""
    mib = 1024 * 1024
    head = "| held by | " + " | ".join(label for label, _, _ in profiles) + " |\n|---|" + "---|" * len(profiles) + "\n"
    rows = [f"| {k} | " + " | ".join(f"{p['sizes'].get(k, 0) / mib:.1f}" for _, _, p in profiles) + " |"
            for k in profiles[-1][2]["sizes"]]  # fmt: skip
    rows.append("| rest: interpreter, imported modules, allocator free space | " + " | ".join(
        f"{rss - sum(p['sizes'].values()) / mib:.1f}" for _, rss, p in profiles) + " |")  # fmt: skip
    rows.append("| **RSS** | " + " | ".join(f"**{rss:.1f}**" for _, rss, _ in profiles) + " |")
    table = head + "\n".join(rows) + "\n"
    if "by_owner" in profiles[-1][2]:
        first, last = profiles[0][2]["by_owner"], profiles[-1][2]["by_owner"]
        owners = sorted(set(first) | set(last), key=lambda o: -(last.get(o, 0) - first.get(o, 0)))[:14]
        table += "\ntracemalloc, by the innermost frame in our package, else Kopf, else the library (MiB):\n\n"
        table += (
            "| allocated by | "
            + " | ".join(label for label, _, _ in profiles)
            + " |\n|---|"
            + "---|" * len(profiles)
            + "\n"
        )
        table += "\n".join(f"| `{o}` | " + " | ".join(f"{p['by_owner'].get(o, 0) / mib:.1f}" for _, _, p in profiles) + " |"
                            for o in owners) + "\n"  # fmt: skip
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--storm", type=int, default=100, help="pools whose high queue jumps at once (0: skip)")
    ap.add_argument("--storms", type=int, default=3, help="storms, each on other pools (the phase varies)")
    ap.add_argument("--steady", type=float, default=60.0, help="seconds of idle fleet to measure CPU and requests")
    ap.add_argument("--no-floor", action="store_true", help="skip the kubectl-only leg (no ratio)")
    ap.add_argument("--memory-profile", action="store_true",
                    help="report where the operator's memory goes (FLEET_TRACE_MALLOC=1: tracemalloc too, slow)")  # fmt: skip
    ap.add_argument("--name", default="", help="result file suffix (default: the pool count)")
    ap.add_argument("--keep", action="store_true", help="leave the operator's namespace behind")
    args = ap.parse_args()

    pods = args.pools * len(TIERS)
    cluster = cluster_with_crds(nodes=max(3, math.ceil(pods * (1 if args.no_floor else 2) * 1.3 / 110)))
    cfg = client.Configuration()
    config.load_kube_config(str(cluster.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    custom = client.CustomObjectsApi(api)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    redis = RedisServer(work / "redis")
    redis.start()
    objs = [pool(i, redis.url) for i in range(args.pools)]
    rows: list[tuple[str, str]] = [("pools x tiers", f"{args.pools} x 3 = {pods} tiers, {pods} pods (kwok)")]
    sections: list[str] = []

    # A previous run's namespaces are deleted in the background when it ends: thousands of objects the
    # garbage collector removes for minutes. Neither leg may run while that loads the control plane.
    leftovers = [n for n in cluster.kubectl("get", "ns", "-o", "name").stdout.split()
                 if n.startswith(("namespace/bench-scale-", "namespace/bench-floor-"))]  # fmt: skip
    for gone in leftovers:
        delete_namespace(cluster, gone.split("/", 1)[1])

    floor_s = None
    fns = f"bench-floor-{args.pools}"
    if not args.no_floor:
        fresh_namespace(cluster, fns)
        children = [c for o in objs for c in floor_children(o, fns)]
        deployments = sum(1 for c in children if c["kind"] == "Deployment")
        load0 = load()
        until = Until(deployments_of(custom), fns, deployment_ready, deployments)
        until.start()
        cp0 = control_plane_cpu()
        t0 = time.monotonic()
        applied = apply_parallel(cluster, fns, children, 300)
        floor_s = until.wait(1800, "floor Deployments Ready") - t0
        floor_cpu = cpu_row(cp0, control_plane_cpu())
        rows += [
            ("floor: the same children with kubectl (300 per request, parallel), no operator",
             f"{len(children)} objects applied in {applied:.1f} s, every pod Ready at **{floor_s:.1f} s** (load {load0} -> {load()})"),
            ("floor: control-plane CPU until every pod Ready", floor_cpu),
        ]  # fmt: skip
        # Left in place (idle: Ready kwok pods cost the control plane nothing) until the end: deleting
        # thousands of Deployments takes minutes of apiserver and controller CPU that would land on the
        # operator's leg; keeping them makes that leg run against a larger store, so the ratio errs high.

    ns = f"bench-scale-{args.pools}"
    fresh_namespace(cluster, ns)
    op: OperatorProcess
    if args.memory_profile:
        op = TracedOperator(cluster, [ns], work, "--workers", "8")
        op.start()
    else:
        op = OperatorProcess(
            cluster.kubeconfig, [ns], work / "operator.log", "--log-level", "WARNING", "--workers", "8"
        )
        op.start()
    assert op.proc is not None
    pid = op.proc.pid
    profiles: list[tuple[str, float, dict[str, Any]]] = []
    try:
        time.sleep(3)  # let start-up settle before the 0-pool figure (an interval, not a condition)
        rss0, cpu0 = proc_usage(pid)
        if isinstance(op, TracedOperator):
            profiles.append(("0 pools (MiB)", rss0, op.profile()))
        req0 = requests_by(op)
        reconciles0 = reconciles(op)
        sampler = Sampler(pid)
        sampler.start()
        load0 = load()
        deps = Until(deployments_of(custom), ns, deployment_ready, pods)
        ready = Until(pools_of(custom), ns, pool_ready, args.pools)
        deps.start()
        ready.start()
        for f in sorted((ROOT / "crds").glob("*.yaml")):  # again: the cluster is shared with other branches
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        cp0 = control_plane_cpu()
        t0 = time.monotonic()
        applied = apply_parallel(cluster, ns, objs, 100)

        def first_reconciled() -> bool:
            p = custom.get_namespaced_custom_object("celeryfleet.io", "v1alpha1", ns, "celeryworkerpools", "p0000")
            why = invalid(p)
            if why is not None:  # fail now, not after the rollout's timeout
                raise SystemExit(f"the operator finds the pools invalid (a CRD from another branch?): {why}")
            return bool(p.get("status"))

        wait_for(first_reconciled, timeout=300, interval=1.0, message="p0000 reconciled")
        deps_s = deps.wait(1800, "tier Deployments Ready") - t0
        ready_s = ready.wait(600, "pools Ready") - t0
        cp1 = control_plane_cpu()
        sampler.stop_flag.set()
        rss1, cpu1 = proc_usage(pid)
        req1 = requests_by(op)
        rollout = delta(req1, req0)
        n_rollout = sum(rollout.values())
        rows += [
            ("operator: the pools with kubectl (100 per request, parallel)", f"applied in {applied:.1f} s (load {load0} -> {load()})"),
            ("operator: every tier's pods Ready / every pool Ready", f"{deps_s:.1f} s / **{ready_s:.1f} s**"),
            ("operator: every tier Deployment created (its own writes, before the cluster makes the pods Ready)",
             f"{deps.all_seen_at - t0:.1f} s" if deps.all_seen_at else "not seen"),
        ]  # fmt: skip
        if floor_s:
            rows.append(
                (
                    "**ratio operator / floor** (target <= 1.15)",
                    f"**{ready_s / floor_s:.2f}** (pods Ready: {deps_s / floor_s:.2f})",
                )
            )
        rows += [
            ("operator RSS at 0 pools / peak during rollout / after", f"{rss0:.0f} / {max(sampler.peak, rss1):.0f} / {rss1:.0f} MiB"),
            ("operator CPU during rollout (own CPU time)", f"{cpu1 - cpu0:.1f} s"),
            ("operator leg: control-plane CPU until every pool Ready", cpu_row(cp0, cp1, f"; with the operator's: {sum(cp1.values()) - sum(cp0.values()) + cpu1 - cpu0:.0f} s")),
            ("apiserver requests by the operator during rollout", f"{n_rollout:.0f} ({n_rollout / args.pools:.2f} per pool)"),
            ("pool reconciles during rollout", f"{reconciles(op) - reconciles0:.0f} ({(reconciles(op) - reconciles0) / args.pools:.2f} per pool)"),
            ("  of which, per pool", per(rollout, args.pools)),
        ]  # fmt: skip

        # Idle: nothing changes; what does polling 1000 pools every second cost?
        time.sleep(5)  # let the last status refreshes of the rollout land (an interval, not a condition)
        s_req0, s_cpu0 = requests_by(op), proc_usage(pid)[1]
        s_polls0 = op.metric("celery_fleet_broker_poll_duration_seconds_count")
        s_load0 = load()
        time.sleep(args.steady)  # measuring an interval of idleness is the point here
        s_req1, (s_rss, s_cpu1) = requests_by(op), proc_usage(pid)
        s_polls = op.metric("celery_fleet_broker_poll_duration_seconds_count") - s_polls0
        idle_cpu = s_cpu1 - s_cpu0
        idle_req = sum(delta(s_req1, s_req0).values())
        pool_polls = s_polls * args.pools
        rows += [
            (f"idle ({args.steady:.0f} s, nothing changing; load {s_load0} -> {load()})",
             f"CPU **{idle_cpu / args.steady * 100:.1f}% of a core** (target <= 5 %), {idle_req / args.steady:.3f} requests/s, RSS {s_rss:.0f} MiB"),
            ("idle CPU per pool-poll", f"{idle_cpu / max(pool_polls, 1) * 1e6:.0f} us ({s_polls:.0f} broker polls x {args.pools} pools)"),
        ]  # fmt: skip
        if isinstance(op, TracedOperator):
            profiles.append((f"{args.pools} pools, idle (MiB)", s_rss, op.profile()))

        if args.storm:
            n = min(args.storm, args.pools // max(1, args.storms))
            sections.append(storm(redis, api, ns, n, op, args.storms, None if args.no_floor else fns))

        if profiles:
            sections.append(
                "\n## Where the memory goes (deep sizes of the operator's structures, bench/_traced_operator.py)\n\n"
                + memory_table(profiles)
            )
        table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
        notes = (
            "\nLoad is the 1/5/15-minute load average (2 cores, shared with other test suites). Requests counted "
            "are the operator's own (server-side applies, status patches, scale, events, Secret reads); Kopf's watch "
            "streams (one per watched resource kind) are not requests per object. Every pool shares one Redis broker, "
            "polled once per second in one pipeline.\n"
        )
        name = f"fleet_scale_{args.name or args.pools}"
        write_result(name, f"Fleet scale: {args.pools} pools", table + notes + "".join(sections))
    finally:
        op.stop()
        redis.stop()
        for gone in ([] if args.keep else [ns]) + ([] if args.no_floor else [f"bench-floor-{args.pools}"]):
            cluster.kubectl("delete", "ns", gone, "--wait=false", check=False)


class PollClock(threading.Thread):
    """When the operator's polls reach Redis (MONITOR's own timestamps, wall clock): the storm's
    latency splits into waiting for the next poll (the phase) and what follows it."""

    def __init__(self, redis: Any, ignore: str) -> None:
        super().__init__(daemon=True)
        self.redis, self.ignore = redis, ignore  # the bench's own client address
        self.stamps: list[float] = []
        self.ready = threading.Event()

    def run(self) -> None:
        conn = self.redis.client().connection_pool.get_connection()
        conn.send_command("MONITOR")
        conn.read_response()  # +OK
        self.ready.set()
        while True:
            try:
                line = conn.read_response()
            except redis_errors.ConnectionError:
                return  # the bench's Redis stopped
            text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
            head, _, rest = text.partition(" [")
            if self.ignore not in rest.split("]", 1)[0]:
                try:
                    self.stamps.append(float(head))
                except ValueError:
                    continue

    def first_after(self, t: float) -> float | None:
        return next((s for s in list(self.stamps) if s >= t), None)


def scale_directly(api: client.ApiClient, ns: str, names: list[str], replicas: int, threads: int) -> None:
    """The storm's floor: the same scale writes sent at once by a plain client, no operator deciding."""
    apps = client.AppsV1Api(api)
    chunks = [names[i::threads] for i in range(threads)]

    def send(chunk: list[str]) -> None:
        for name in chunk:
            apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": replicas}})

    workers = [threading.Thread(target=send, args=(c,)) for c in chunks if c]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def latencies(first_at: dict[str, float], landed: float) -> tuple[float, float, float, float]:
    """First, p50, p99 and last, in seconds after `landed`."""
    lat = sorted(t - landed for t in first_at.values())
    return lat[0], lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1]


def storm(
    redis: Any, api: client.ApiClient, ns: str, n: int, op: OperatorProcess, storms: int, floor_ns: str | None
) -> str:
    """Queue depth jumps at once for n pools on one broker, `storms` times (other pools each time);
    time until every tier has its new replicas. The single figure is a poor one: every pool of a
    storm waits for the same next poll, so one storm's p99 carries one draw of the phase (0-1 s)."""
    custom = client.CustomObjectsApi(api)
    before = requests_by(op)
    r = redis.client()
    me = r.client_info()["addr"]
    clock = PollClock(redis, me)
    clock.start()
    clock.ready.wait(10)
    wall = time.time() - time.monotonic()  # MONITOR stamps are wall clock; the watch's are monotonic
    rows, pooled = [], []
    for k in range(storms):
        names = [f"p{i:04d}" for i in range(k * n, (k + 1) * n)]
        # Watching (plain dicts) before the burst, so no early scale can slip in ahead of the watch.
        scaled = Until(deployments_of(custom, "celeryfleet.io/tier=high"), ns, lambda d: d["spec"].get("replicas") == 3,
                       n * (k + 1))  # fmt: skip
        scaled.start()
        wait_for(lambda s=scaled: s.watching, timeout=60, message="the storm's watch")
        with r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lpush(f"{name}_high", *([b"{}"] * 25))  # depth 25 / target 10 -> 3 replicas
            t0 = time.monotonic()
            pipe.execute()
        landed = time.monotonic()
        scaled.wait(300, "storm tiers scaled")
        scaled.stop_flag.set()
        mine = {d: t for d, t in scaled.first_at.items() if d.split("-")[0] in set(names)}
        first, p50, p99, last = latencies(mine, landed)
        pooled += [t - landed for t in mine.values()]
        poll = clock.first_after(landed + wall)
        phase = (poll - wall - landed) if poll is not None else float("nan")
        rows.append(f"| {k + 1} | {landed - t0:.3f} | {phase:.2f} | {first - phase:.2f} | {first:.2f} / {p50:.2f} / "
                    f"**{p99:.2f}** / {last:.2f} | {last - first:.2f} |")  # fmt: skip
    pooled.sort()
    all_p99 = pooled[min(len(pooled) - 1, int(len(pooled) * 0.99))]
    # The decisions' own requests (scale, Event, status refresh) land within a few seconds of the scale.
    wait_for(lambda: sum(delta(requests_by(op), before).values()) >= 3 * n * storms, timeout=30, interval=0.5)
    time.sleep(3)  # the status refreshes trail the scale (an interval, not a condition)
    made = delta(requests_by(op), before)
    out = (
        f"\n## Storm: {n} pools' high queues jump at once, {storms} times, other pools each time "
        f"(25 messages each, one pipelined write; load {load()})\n\n"
        "Phase: from the burst to the operator's next poll reaching Redis (MONITOR). After the poll: to the first "
        "tier scaled. Spread: first to last tier scaled.\n\n"
        "| storm | burst write (s) | phase (s) | poll to first scaled (s) | first / p50 / **p99** / last (s) | "
        "spread (s) |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| p99 over all {len(pooled)} tiers (target p99 <= 1.5 s) | **{all_p99:.2f} s** |\n"
        f"| requests per scaling decision | {sum(made.values()) / (n * storms):.2f}: {per(made, n * storms)} |\n"
    )
    if floor_ns is not None:
        # The same n scale writes, sent by the bench at once to the floor's own Deployments.
        names = [tier_child_name(f"p{i:04d}", "high") for i in range(n)]
        seen = Until(deployments_of(custom, "celeryfleet.io/tier=high"), floor_ns,
                     lambda d: d["spec"].get("replicas") == 3, n)  # fmt: skip
        seen.start()
        wait_for(lambda: seen.watching, timeout=60, message="the floor storm's watch")
        t0 = time.monotonic()
        scale_directly(api, floor_ns, names, 3, OPERATOR_KUBE_THREADS)
        sent = time.monotonic() - t0
        seen.wait(300, "floor storm scaled")
        seen.stop_flag.set()
        first, p50, p99, last = latencies(seen.first_at, t0)
        out += (
            f"| floor: the same {n} scale writes sent at once by a plain client ({OPERATOR_KUBE_THREADS} threads) "
            f"to the floor's Deployments | sent in {sent:.2f} s; seen first / p50 / **p99** / last "
            f"{first:.2f} / {p50:.2f} / **{p99:.2f}** / {last:.2f} s |\n"
        )
    return out


if __name__ == "__main__":
    main()
