"""The real closed-loop check: one short trace through the live stack, held against the simulation.

Live: the local cluster, a real Redis, the real operator (`celery-fleet run`) and the local runtime
(`celery-fleet localrun`, development only) running real `celery worker` processes of the demo app
for a tier shaped like `CLOSED_LOOP_TIER`. The trace (`closed_loop_trace()`: a 150-task step burst
over a light background, 150 s) is replayed with Celery's own `apply_async` at its arrival times
and priorities; each task records when it was sent and when it started (demo/demoapp/tasks.py).

Measured while it runs (a watcher polls the apiserver every 0.1 s): every change of the tier
Deployment's spec.replicas, when each pod appeared, when the local runtime reported its worker
connected to the broker (Ready), and when its process exited. From those: each new worker's
start-up delay (spec.replicas rise -> worker ready), peak replicas and worker-seconds.

Predicted: `predict_waits(trace, CLOSED_LOOP_TIER, startup_delay=<the measured range>)`, the
simulator driving the operator's real `decide`. The start-up delay is the one input taken from
the live run: it is a property of the machine (a loaded 2-core laptop starts Python slowly), not
of the autoscaling, which is what the check is about.

Tolerance (`_sim.Tolerance()`, reasoned in bench/_sim/closed_loop.py): p50 and p95 wait within
max(2 s, 25 %) of the simulation, peak replicas within 1, worker-seconds within 25 %. The fixed 2 s
covers latencies the simulation leaves out (the operator's poll phase, the apiserver round trips,
the local runtime's 0.25 s sync); the 25 % covers per-task costs that grow down a long queue (Celery
dispatch, acks). A wrong model (in-flight not counted, priority lists not read, a start-up off by a
factor) moves p95 by more than that: the table in bench/results/autoscale_sim.md shows which.

Writes bench/results/closed_loop.md; exits 1 when the live run and the simulation disagree.
Run: `.venv/bin/python bench/closed_loop.py` (the local cluster must be up: `make cluster-up`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import ROOT, Cluster, RedisServer, cluster_with_crds, start_operator, wait_for, write_result
from _sim import CLOSED_LOOP_TIER, Tolerance, closed_loop_trace, compare_waits, percentile, predict_waits
from celery import Celery
from kubernetes import client, config

from celery_fleet_localrun.cluster import RUN_LABELS

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
POOL = "loop"
PID_IN_MESSAGE = re.compile(r"worker: pid (\d+), connected to the broker")
TRACE_ID = re.compile(r"^trace-(\d+)$")


@dataclass
class PodTrack:
    name: str
    first_seen: float
    ready_at: float | None = None
    pid: int | None = None
    gone_at: float | None = None
    exit_at: float | None = None


@dataclass
class Watch:
    """What the watcher saw, in unix time."""

    spec: list[tuple[float, int]] = field(default_factory=list)
    pods: dict[str, PodTrack] = field(default_factory=dict)
    errors: int = 0


class Watcher(threading.Thread):
    def __init__(self, kubeconfig: Path, namespace: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="closed-loop-watcher")
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.api = client.ApiClient(cfg)
        self.namespace = namespace
        self.interval = interval
        self.seen = Watch()
        self.stopping = threading.Event()

    def run(self) -> None:
        apps, core = client.AppsV1Api(self.api), client.CoreV1Api(self.api)
        while not self.stopping.is_set():
            try:
                self._poll(apps, core)
            except Exception:  # a slow or failed read is a gap in the record, not the end of the watch
                self.seen.errors += 1
            self.stopping.wait(self.interval)

    def _poll(self, apps: client.AppsV1Api, core: client.CoreV1Api) -> None:
        now = time.time()
        replicas = int(apps.read_namespaced_deployment(f"{POOL}-high", self.namespace).spec.replicas or 0)
        if not self.seen.spec or self.seen.spec[-1][1] != replicas:
            self.seen.spec.append((now, replicas))
        pods = core.list_namespaced_pod(self.namespace, label_selector=f"{GROUP}/pool={POOL}").items
        live = set()
        for pod in pods:
            name = pod.metadata.name
            track = self.seen.pods.setdefault(name, PodTrack(name, now))
            if pod.metadata.deletion_timestamp:
                continue
            live.add(name)
            ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
            if track.ready_at is None and ready is not None and ready.reason == "LocalProcessReady":
                match = PID_IN_MESSAGE.search(ready.message or "")
                if ready.status == "True" and match:
                    track.ready_at, track.pid = now, int(match.group(1))
        for track in self.seen.pods.values():
            if track.gone_at is None and track.name not in live:
                track.gone_at = now
            # The pod object goes at once (kwok); the worker runs on through its warm shutdown.
            exited = track.pid is None or not Path(f"/proc/{track.pid}").exists()
            if track.gone_at is not None and track.exit_at is None and exited:
                track.exit_at = now

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.api.close()


def pool_manifest() -> dict[str, Any]:
    tier = CLOSED_LOOP_TIER.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": POOL},
        "spec": {
            "app": "demoapp",
            "image": "local/celery-fleet-demo:dev",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
            "podLabels": RUN_LABELS,
            "tiers": [tier],
        },
    }


def ready_pids(core: client.CoreV1Api, namespace: str) -> dict[str, int]:
    out = {}
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/pool={POOL}").items:
        ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
        match = PID_IN_MESSAGE.search((ready.message or "") if ready else "")
        if ready is not None and ready.status == "True" and ready.reason == "LocalProcessReady" and match:
            out[pod.metadata.name] = int(match.group(1))
    return out


def replay(broker_url: str, trace: Any, t0: float) -> float:
    """Send every task at its arrival time; returns the largest lateness of a send (seconds)."""
    app = Celery("closed-loop-producer", broker=broker_url)
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    queue = CLOSED_LOOP_TIER.queues[0]
    late = 0.0
    with app.producer_or_acquire() as producer:
        for task in trace.tasks:
            delay = t0 + task.arrival - time.time()
            if delay > 0:
                time.sleep(delay)
            sent = time.time()
            late = max(late, sent - (t0 + task.arrival))
            app.send_task(
                "demoapp.work", args=[task.duration], kwargs={"sent_at": sent}, task_id=f"trace-{task.id}",
                queue=queue, priority=task.priority, producer=producer,
            )  # fmt: skip
    return late


def startup_delays(seen: Watch, t0: float) -> list[float]:
    """For each pod created by a rise of spec.replicas after t0: rise -> worker ready."""
    rises = [t for (t, n), (_, before) in zip(seen.spec[1:], seen.spec, strict=False) if n > before and t >= t0]
    delays = []
    for track in seen.pods.values():
        if track.ready_at is None or track.first_seen < t0:
            continue
        cause = max((t for t in rises if t <= track.first_seen + 0.05), default=None)
        if cause is not None:
            delays.append(track.ready_at - cause)
    return delays


def worker_seconds(seen: Watch, start: float, end: float) -> float:
    total = 0.0
    for track in seen.pods.values():
        stop = track.exit_at if track.exit_at is not None else end
        total += max(0.0, min(stop, end) - max(track.first_seen, start))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".local" / "bench-closed-loop")
    args = parser.parse_args(argv)

    trace = closed_loop_trace(args.seed)
    cluster: Cluster = cluster_with_crds()
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = f"closed-loop-{uuid.uuid4().hex[:6]}"
    redis = RedisServer(workdir / "redis")
    redis.start()
    operator = None
    localrun = None
    watcher = None
    try:
        cluster.kubectl("create", "namespace", namespace)
        cluster.kubectl("-n", namespace, "create", "secret", "generic", "broker", f"--from-literal=url={redis.url}")
        operator = start_operator(cluster, [namespace], workdir)
        with (workdir / "localrun.log").open("wb") as log:
            localrun = subprocess.Popen(
                [sys.executable, "-m", "celery_fleet_localrun", "--namespace", namespace,
                 "--kubeconfig", str(cluster.kubeconfig), "--state-dir", str(workdir / "localrun"),
                 "--pythonpath", str(ROOT / "demo"), "--interval", "0.25"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool_manifest()))
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        core = client.CoreV1Api(client.ApiClient(cfg))
        minimum = CLOSED_LOOP_TIER.replicas.min
        wait_for(lambda: len(ready_pids(core, namespace)) >= minimum, timeout=180, message="the tier's minimum ready")

        watcher = Watcher(cluster.kubeconfig, namespace)
        watcher.start()
        rdb = redis.client()
        t0 = time.time() + 1.0
        print(f"replaying {trace.name}: {trace.description}, {trace.horizon:g} s", flush=True)
        late = replay(redis.url, trace, t0)

        def all_started() -> bool:
            return int(rdb.llen("demo:started")) >= len(trace.tasks) and time.time() >= t0 + trace.horizon

        wait_for(all_started, timeout=trace.horizon + 600, interval=1.0, message="every task started")
        wait_for(lambda: int(rdb.llen("demo:done")) >= len(trace.tasks), timeout=300, interval=0.5,
                 message="every task done")  # fmt: skip

        measured: dict[int, float] = {}
        for raw in rdb.lrange("demo:started", 0, -1):
            record = json.loads(raw)
            match = TRACE_ID.match(str(record.get("id")))
            if match and record.get("sent") is not None:
                measured[int(match.group(1))] = float(record["started"]) - float(record["sent"])

        delays = startup_delays(watcher.seen, t0)
        startup = (min(delays), max(delays)) if delays else (2.0, 4.0)
        prediction = predict_waits(trace, CLOSED_LOOP_TIER, startup_delay=startup)
        # Both sides pay for the same span: the simulation's, from t=0 to its end.
        end = t0 + prediction.result.end
        wait_for(lambda: time.time() >= end, timeout=max(1.0, end - time.time() + 5), interval=0.5,
                 message="the simulated span")  # fmt: skip
        watcher.stop()
        seen = watcher.seen
        live_peak = max(n for t, n in seen.spec if t >= t0)
        live_ws = worker_seconds(seen, t0, end)
        agreement = compare_waits(prediction, measured, live_peak_replicas=live_peak, live_worker_seconds=live_ws)
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.stop()
        if localrun is not None:
            localrun.send_signal(signal.SIGTERM)
            try:
                localrun.wait(timeout=60)
            except subprocess.TimeoutExpired:
                localrun.kill()
        if operator is not None:
            operator.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        redis.stop()

    tol = Tolerance()
    live_waits = list(measured.values())
    sim_waits = list(prediction.waits.values())
    rows = [
        "| metric | simulated | measured | allowed +- | verdict |",
        "|---|---:|---:|---:|:---:|",
        *(f"| {c.metric} | {c.simulated:.2f} | {c.measured:.2f} | {c.allowed:.2f} | {'ok' if c.ok else '**out**'} |"
          for c in agreement.checks),
    ]  # fmt: skip
    spec_changes = ", ".join(f"{t - t0:+.1f}s->{n}" for t, n in seen.spec if t >= t0 - 1)
    body = "\n".join([
        f"Trace `closed_loop_trace({args.seed})`: {trace.description}; {len(trace.tasks)} tasks, {trace.horizon:g} s. "
        f"Tier `CLOSED_LOOP_TIER`: queue `{CLOSED_LOOP_TIER.queues[0]}`, {CLOSED_LOOP_TIER.replicas.min}-"
        f"{CLOSED_LOOP_TIER.replicas.max} pods x {CLOSED_LOOP_TIER.concurrency} threads of the demo app, "
        "`Autoscaling` defaults, real operator, real Redis, real `celery worker` processes (local runtime).",
        "",
        *rows,
        "",
        f"Verdict: **{'agree' if agreement.ok else 'DISAGREE'}** within the tolerance (p50/p95 wait within "
        f"max({tol.absolute:g} s, {tol.relative:.0%}) of the simulation, peak replicas within {tol.replicas}, "
        f"worker-seconds within {tol.worker_seconds:.0%}).",
        *([f"\n{agreement.report()}"] if not agreement.ok else []),
        "",
        f"- measured start-up (spec.replicas rise -> worker connected), fed to the simulation: "
        f"{startup[0]:.1f}-{startup[1]:.1f} s over {len(delays)} new workers"
        + ("" if delays else " (no scale-up seen: the default 2-4 s was used)"),
        f"- live waits: p50 {percentile(live_waits, 50):.2f} s, p95 {percentile(live_waits, 95):.2f} s, "
        f"p99 {percentile(live_waits, 99):.2f} s, max {max(live_waits):.2f} s over {len(live_waits)} tasks",
        f"- simulated waits: p50 {percentile(sim_waits, 50):.2f} s, p95 {percentile(sim_waits, 95):.2f} s, "
        f"p99 {percentile(sim_waits, 99):.2f} s, max {max(sim_waits):.2f} s",
        f"- live spec.replicas (s from the trace start -> replicas): {spec_changes}",
        "- simulated spec.replicas: " + ", ".join(f"{t:+.1f}s->{n}" for t, n in prediction.replicas),
        f"- producer: latest send {late * 1000:.0f} ms behind its arrival time; watcher read errors: {seen.errors}",
        "",
        "Why this tolerance: see the module docstrings of bench/closed_loop.py and bench/_sim/closed_loop.py.",
    ])  # fmt: skip
    write_result("closed_loop", "Closed loop: live run vs simulation", body)
    return 0 if agreement.ok and not math.isnan(percentile(live_waits, 50)) else 1


if __name__ == "__main__":
    sys.exit(main())
