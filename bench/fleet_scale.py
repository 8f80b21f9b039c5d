"""Fleet scale: N pools x 3 tiers applied at once -> all Ready; memory, CPU, API requests; a storm.

Issue 4's benchmark (200 pools) and issue 9's (1000 pools):
    .venv/bin/python bench/fleet_scale.py --pools 200
    .venv/bin/python bench/fleet_scale.py --pools 1000 --storm 100
Each tier runs min 1 replica (3 kwok pods per pool) so 1000 pools fit in the local cluster.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import (
    RedisServer,
    cluster_with_crds,
    proc_usage,
    start_operator,
    wait_for,
    write_result,
)
from kubernetes import client, config, watch

TIERS = ("high", "medium", "low")


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


class Sampler(threading.Thread):
    """Peak RSS of the operator while the phase runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.5):
            self.peak = max(self.peak, proc_usage(self.pid)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--storm", type=int, default=100, help="pools whose high queue jumps at once (0: skip)")
    ap.add_argument("--steady", type=float, default=60.0, help="seconds of steady state to count API requests")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    pods = args.pools * len(TIERS) * 1
    cluster = cluster_with_crds(nodes=max(3, math.ceil(pods * 1.3 / 110)))
    cfg = client.Configuration()
    config.load_kube_config(str(cluster.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    ns = f"bench-scale-{args.pools}"
    if cluster.kubectl("get", "ns", ns, check=False).returncode == 0:
        cluster.kubectl("delete", "ns", ns, "--wait=true", timeout=600)
    cluster.kubectl("create", "ns", ns)

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    redis = RedisServer(work / "redis")
    redis.start()
    op = start_operator(cluster, [ns], work, "--workers", "8")
    assert op.proc is not None
    pid = op.proc.pid
    try:
        rss0, cpu0 = proc_usage(pid)
        req0 = op.metric("celery_fleet_kube_api_requests")
        sampler = Sampler(pid)
        sampler.start()
        t0 = time.monotonic()
        objs = [pool(i, redis.url) for i in range(args.pools)]
        # Apply in chunks from threads, as a GitOps sync of many files would.
        chunks = [objs[i : i + 100] for i in range(0, len(objs), 100)]
        threads = [threading.Thread(target=_apply, args=(cluster, ns, c)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        applied = time.monotonic() - t0

        def all_ready() -> bool:
            items = custom.list_namespaced_custom_object("celeryfleet.io", "v1alpha1", ns, "celeryworkerpools")["items"]
            ready = sum(
                1 for p in items
                if any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))
            )  # fmt: skip
            return ready == args.pools

        wait_for(all_ready, timeout=1800, interval=1.0, message="all pools Ready")
        ready_s = time.monotonic() - t0
        sampler.stop_flag.set()
        rss1, cpu1 = proc_usage(pid)
        req1 = op.metric("celery_fleet_kube_api_requests")

        # Steady state: nothing changes; count what the operator asks of the apiserver.
        time.sleep(2)
        s_req0, s_cpu0 = op.metric("celery_fleet_kube_api_requests"), proc_usage(pid)[1]
        time.sleep(args.steady)  # measuring an interval of idleness is the point here
        s_req1, (s_rss, s_cpu1) = op.metric("celery_fleet_kube_api_requests"), proc_usage(pid)
        polls = op.metric("celery_fleet_broker_poll_duration_seconds_count")

        storm_rows = ""
        if args.storm:
            storm_rows = storm(redis, apps, ns, min(args.storm, args.pools), op)

        rows = [
            ("pools x tiers", f"{args.pools} x 3 = {args.pools * 3} tiers, {pods} pods (kwok)"),
            ("apply (kubectl, 100 per request, parallel)", f"{applied:.1f} s"),
            ("time until every pool Ready", f"{ready_s:.1f} s"),
            ("operator RSS before / peak / after", f"{rss0:.0f} / {max(sampler.peak, rss1):.0f} / {rss1:.0f} MiB"),
            ("operator CPU during rollout", f"{cpu1 - cpu0:.1f} s"),
            ("apiserver requests by the operator during rollout", f"{req1 - req0:.0f} ({(req1 - req0) / args.pools:.1f} per pool)"),
            (f"steady state ({args.steady:.0f} s, nothing changing)",
             f"{(s_req1 - s_req0) / args.steady:.3f} requests/s, CPU {(s_cpu1 - s_cpu0) / args.steady * 100:.1f}% of a core, RSS {s_rss:.0f} MiB"),
            ("broker polls so far (one pipelined round trip each, all pools share it)", f"{polls:.0f}"),
        ]  # fmt: skip
        table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
        notes = (
            "\nRequests counted are the operator's own (server-side applies, status patches, scale, events, "
            "Secret reads); Kopf's watch streams (one per watched resource kind) are not requests per object. "
            "Every pool shares one Redis broker, polled once per second in one pipeline.\n"
        )
        write_result(f"fleet_scale_{args.pools}", f"Fleet scale: {args.pools} pools", table + notes + storm_rows)
    finally:
        op.stop()
        redis.stop()
        if not args.keep:
            cluster.kubectl("delete", "ns", ns, "--wait=false", check=False)


def _apply(cluster: Any, ns: str, objs: list[dict[str, Any]]) -> None:
    from _harness import kubectl_apply_many

    kubectl_apply_many(cluster, ns, objs)


def storm(redis: Any, apps: client.AppsV1Api, ns: str, n: int, op: Any) -> str:
    """Queue depth jumps at once for n pools on one broker; time until every tier has its new replicas."""
    r = redis.client()
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.lpush(f"p{i:04d}_high", *([b"{}"] * 25))  # depth 25 / target 10 -> 3 replicas
        t0 = time.monotonic()
        pipe.execute()
    landed = time.monotonic()
    done_at: dict[str, float] = {}
    # A watch, not a tight list loop: listing hundreds of Deployments every few ms would load the
    # apiserver (and this 2-core machine) more than the operator under test does.
    rv = apps.list_namespaced_deployment(
        ns, label_selector="celeryfleet.io/tier=high", limit=1
    ).metadata.resource_version
    w = watch.Watch()
    deadline = time.monotonic() + 300
    for ev in w.stream(apps.list_namespaced_deployment, ns, label_selector="celeryfleet.io/tier=high",
                       resource_version=rv, timeout_seconds=300):  # fmt: skip
        d = ev["object"]
        if d.spec.replicas == 3 and d.metadata.name not in done_at:
            done_at[d.metadata.name] = time.monotonic()
        if len(done_at) >= n or time.monotonic() > deadline:
            w.stop()
    if len(done_at) < n:
        raise AssertionError(f"only {len(done_at)} of {n} storm tiers scaled")
    lat = sorted(t - landed for t in done_at.values())
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return (
        f"\n## Storm: {n} pools' high queues jump at once (25 messages each, one pipelined write)\n\n"
        f"| measure | value |\n|---|---|\n| write of the burst | {landed - t0:.3f} s |\n"
        f"| first tier scaled | {lat[0]:.2f} s after the burst landed |\n"
        f"| p50 / p99 / last tier scaled | {p50:.2f} / {p99:.2f} / {lat[-1]:.2f} s |\n"
    )


if __name__ == "__main__":
    main()
