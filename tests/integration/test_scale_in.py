"""Issue 12: scale-in never loses work under Celery's defaults (early ack), with real workers.

The real operator, the local runtime running real `celery worker` processes of a plain app
(tests/support/plainapp: Celery's defaults, early ack), a real Redis. Every test counts tasks
lost, killed (cut short) and redelivered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kubernetes import client

from celery_fleet_localrun.cluster import RUN_LABELS
from tests.support.cluster import ROOT, Cluster
from tests.support.local_runtime import LocalRuntime
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"
PID_IN_MESSAGE = re.compile(r"worker: pid (\d+), connected to the broker")
TASK_SECONDS = 15.0


@pytest.fixture
def localrun(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(cluster, namespace, tmp_path, pythonpath=ROOT / "tests" / "support")
    yield runtime
    runtime.stop()


def _queue(namespace: str) -> str:
    # One queue per test: a finished test's namespace (and its pool, reading the same Redis) lingers a while.
    return f"work-{namespace[-6:]}"


def _pool(
    name: str, queue: str, *, acks_late: bool = False, lo: int = 0, hi: int = 4, grace: int = 5,
    visibility_timeout: int | None = None, remote_control: bool = True, **knobs: Any,
) -> dict[str, Any]:  # fmt: skip
    autoscaling = {"targetDepthPerReplica": 1, "scaleDownStabilizationSeconds": 5, "scaleDownMaxStep": 4,
                   "scaleDownPeriodSeconds": 1, "cooldownSeconds": 5, **knobs}  # fmt: skip
    env = [{"name": "PLAIN_ACKS_LATE", "value": "1"}] if acks_late else []
    if not remote_control:
        env.append({"name": "PLAIN_REMOTE_CONTROL", "value": "0"})
    broker: dict[str, Any] = {"urlSecretRef": {"name": "broker", "key": "url"}}
    if visibility_timeout is not None:  # the app's and the pool's, alike
        env.append({"name": "PLAIN_VISIBILITY_TIMEOUT", "value": str(visibility_timeout)})
        broker["visibilityTimeoutSeconds"] = visibility_timeout
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "plainapp",
            "image": "local/plainapp:dev",
            "broker": broker,
            "env": env,
            "podLabels": RUN_LABELS,
            "tiers": [
                # A grace period shorter than a task: removing a busy worker would cut its task short.
                {"name": "work", "queues": [queue], "concurrency": 1, "terminationGracePeriodSeconds": grace,
                 "replicas": {"min": lo, "max": hi}, "autoscaling": autoscaling},
            ],
        },
    }  # fmt: skip


def _setup(cluster: Cluster, k8s_api: client.ApiClient, namespace: str, url: str, pool: dict[str, Any]) -> None:
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": url}}
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))


def _send(url: str, queue: str, count: int, seconds: float, *, again: float | None = None, **options: Any) -> None:
    """`count` tasks holding a worker `seconds` (`again`: as long, when redelivered)."""
    app = Celery("producer", broker=url)
    app.conf.broker_connection_retry_on_startup = False
    args = [seconds] if again is None else [seconds, again]
    with app.connection_for_write() as conn:
        for _ in range(count):
            app.send_task("plainapp.hold", args=args, queue=queue, connection=conn, **options)


def _records(redis_db: Any, key: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis_db.lrange(key, 0, -1)]


def _events(k8s_api: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    return [e for e in client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
            if e.involved_object.name == name]  # fmt: skip


def _ready_pids(k8s_api: client.ApiClient, namespace: str) -> dict[str, int]:
    out = {}
    for pod in client.CoreV1Api(k8s_api).list_namespaced_pod(namespace).items:
        if pod.metadata.deletion_timestamp:
            continue
        ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
        match = PID_IN_MESSAGE.search((ready.message or "") if ready else "")
        if ready is not None and ready.status == "True" and match:
            out[pod.metadata.name] = int(match.group(1))
    return out


@dataclass
class Timeline:
    """spec.replicas and pod lifetimes as a watcher saw them (unix time)."""

    replicas: list[tuple[float, int]] = field(default_factory=list)
    pods_seen: dict[str, float] = field(default_factory=dict)
    pods_gone: dict[str, float] = field(default_factory=dict)


class Watcher(threading.Thread):
    def __init__(self, k8s_api: client.ApiClient, namespace: str, deployment: str) -> None:
        super().__init__(daemon=True)
        self.apps, self.core = client.AppsV1Api(k8s_api), client.CoreV1Api(k8s_api)
        self.namespace, self.deployment = namespace, deployment
        self.seen = Timeline()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                now = time.time()
                n = int(self.apps.read_namespaced_deployment(self.deployment, self.namespace).spec.replicas or 0)
                if not self.seen.replicas or self.seen.replicas[-1][1] != n:
                    self.seen.replicas.append((now, n))
                live = {p.metadata.name for p in self.core.list_namespaced_pod(self.namespace).items
                        if not p.metadata.deletion_timestamp}  # fmt: skip
                for name in live:
                    self.seen.pods_seen.setdefault(name, now)
                for name in set(self.seen.pods_seen) - live:
                    self.seen.pods_gone.setdefault(name, now)
            except Exception:  # a failed read is a gap in the record
                pass
            self.stopping.wait(0.2)

    def stop(self) -> Timeline:
        self.stopping.set()
        self.join(timeout=5)
        return self.seen


def _replicas_at(timeline: Timeline, at: float) -> int:
    value = 0
    for t, n in timeline.replicas:
        if t <= at:
            value = n
    return value


def _account(redis_db: Any, sent: int) -> dict[str, int]:
    started, done = _records(redis_db, "plain:started"), _records(redis_db, "plain:done")
    return {
        "lost": sent - len({r["id"] for r in done}),
        "started_twice": len(started) - len({r["id"] for r in started}),
        "redelivered": sum(1 for r in started if r["redelivered"]),
        "killed": len({r["id"] for r in started} - {r["id"] for r in done}),
    }


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack-default", "acks-late"])
def test_issue_scenario_no_task_lost_busy_workers_kept_idle_pods_removed(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime, acks_late: bool,
) -> None:  # fmt: skip
    pool = _pool("scen", _queue(namespace), acks_late=acks_late)
    # Celery's own default (prefetch on), not the operator's: busy workers then hold a reserved message each.
    pool["spec"]["tiers"][0]["disablePrefetch"] = False
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)
    wait_for(lambda: client.AppsV1Api(k8s_api).read_namespaced_deployment("scen-work", namespace), timeout=60,
             message="the tier Deployment")  # fmt: skip
    watcher = Watcher(k8s_api, namespace, "scen-work")
    watcher.start()
    try:
        _send(redis_server.url, _queue(namespace), 4, TASK_SECONDS)
        wait_for(lambda: len(_records(redis_db, "plain:done")) == 4, timeout=180,
                 message=lambda: f"4 tasks done (have {redis_db.llen('plain:done')}); "
                 f"localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
        wait_for(lambda: watcher.seen.replicas and watcher.seen.replicas[-1][1] == 0, timeout=60,
                 message="back to 0 once idle")  # fmt: skip
    finally:
        timeline = watcher.stop()

    account = _account(redis_db, 4)
    censuses = operator.metric("celery_fleet_worker_censuses_total")
    broadcasts = operator.metric("celery_fleet_remote_control_broadcasts_total")
    print(f"issue-12 scenario ({'acks_late' if acks_late else 'early ack'}): tasks {account}; "
          f"replicas {[n for _, n in timeline.replicas]}; operator totals so far: {censuses:g} censuses, "
          f"{broadcasts:g} remote-control broadcasts")  # fmt: skip
    assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account

    started, done = _records(redis_db, "plain:started"), {r["id"]: r for r in _records(redis_db, "plain:done")}
    busy_pods = {r["worker"] for r in started}
    # spec.replicas never below the workers running a task at that moment.
    for t, _n in timeline.replicas:
        running = {r["worker"] for r in started if r["at"] <= t < done[r["id"]]["at"]}
        assert _replicas_at(timeline, t) >= len(running), (t, running, timeline.replicas)
    # Idle first: no pod that ran a task went away before its last task finished.
    for pod in busy_pods:
        last = max(done[r["id"]]["at"] for r in started if r["worker"] == pod)
        assert timeline.pods_gone.get(pod, float("inf")) >= last, (pod, timeline.pods_gone)
    # The first scale-in removed only pods that never ran anything.
    first_down = next(
        t for (t, n), (_, prev) in zip(timeline.replicas[1:], timeline.replicas, strict=False) if n < prev
    )
    after = [t for t, _ in timeline.replicas if t > first_down]
    until = after[0] if after else first_down + 30
    removed_first = {p for p, gone in timeline.pods_gone.items() if first_down <= gone < until}
    running = {r["worker"] for r in started if r["at"] <= first_down < done[r["id"]]["at"]}
    assert removed_first and not removed_first & running, (removed_first, running)
    # Every decision's message (Events of one reason are aggregated; the log keeps each one).
    decisions = [line for line in operator.logs().splitlines() if f"{namespace}/scen: Scaled tier work" in line]
    if not acks_late:
        # Under early ack two workers each run one task and hold one: Redis alone would let the tier go.
        assert any(re.search(r"kept \d busy workers?", line) for line in decisions), decisions
    assert "SIGKILL" not in localrun.logs()


def test_countdown_tasks_are_scheduled_not_demand(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("eta", _queue(namespace), lo=1))
    wait_for(lambda: _ready_pids(k8s_api, namespace) or None, timeout=120, message="the min worker is ready")
    watcher = Watcher(k8s_api, namespace, "eta-work")
    watcher.start()
    try:
        _send(redis_server.url, _queue(namespace), 30, 1.0, countdown=600)

        def scheduled_shown() -> dict[str, Any] | None:
            pool = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "eta"
            )
            tier = next(iter((pool.get("status") or {}).get("tiers") or []), {})
            return tier if tier.get("scheduled") == 30 else None

        metric = f'celery_fleet_tier_scheduled_tasks{{namespace="{namespace}",pool="eta",tier="work"}} 30.0'
        wait_for(lambda: metric in operator.metrics(), timeout=120, message="the scheduled-tasks metric says 30")
        tier = wait_for(scheduled_shown, timeout=120, message="status shows 30 scheduled")
        wait_for(lambda: watcher.seen.replicas[-1][1] == 1, timeout=60, message="tier at its min 1")
        # Held in `unacked` by the worker, not queued.
        assert redis_db.hlen("unacked") == 30 and redis_db.llen(_queue(namespace)) == 0
    finally:
        timeline = watcher.stop()
    print(f"countdown: replicas {[n for _, n in timeline.replicas]}, status {tier}")
    assert tier["desiredReplicas"] == 1
    assert "celery_fleet_tier_scheduled_tasks" in operator.metrics()


def test_silent_worker_is_treated_as_busy(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("mute", _queue(namespace), lo=2))
    pids = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and len(p) == 2 and p, timeout=180,
                    message="two ready workers")  # fmt: skip
    stopped, _other = sorted(pids)
    os.kill(pids[stopped], signal.SIGSTOP)
    try:
        pool = _pool("mute", _queue(namespace), lo=0)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))
        # The idle one goes; the stopped one cannot say it is idle, so it stays.
        wait_for(lambda: set(_ready_pids(k8s_api, namespace)) == {stopped}, timeout=60,
                 message=lambda: f"only the stopped worker left (have {_ready_pids(k8s_api, namespace)})")  # fmt: skip
        scaled = [e.message for e in _events(k8s_api, namespace, "mute") if e.reason == "ScaledDown"]
        assert any(f"kept 1 busy worker (1 not answering: {stopped})" in m for m in scaled), scaled
        deployment = client.AppsV1Api(k8s_api).read_namespaced_deployment("mute-work", namespace)
        assert deployment.spec.replicas == 1
        pool = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mute")
        assert pool["status"]["tiers"][0].get("busyWorkers") == 1
    finally:
        os.kill(pids[stopped], signal.SIGCONT)
    # Answering again and idle: it goes too.
    wait_for(lambda: client.AppsV1Api(k8s_api).read_namespaced_deployment("mute-work", namespace).spec.replicas == 0,
             timeout=60, message="scaled to 0 once the worker answers idle")  # fmt: skip


def test_drained_worker_starts_no_task_after_the_decision_while_tasks_keep_arriving(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    queue = _queue(namespace)
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("drain", queue, lo=3))
    wait_for(lambda: len(_ready_pids(k8s_api, namespace)) == 3, timeout=180, message="three ready workers")
    stop = threading.Event()
    sent = 0

    def trickle() -> None:
        nonlocal sent
        while not stop.is_set():
            _send(redis_server.url, queue, 1, 0.5)
            sent += 1
            stop.wait(0.5)

    producer = threading.Thread(target=trickle, daemon=True)
    producer.start()
    drained_line = re.compile(rf"^(\S+ \S+) INFO .*{namespace}/drain: tier work: drained (.+) before scale-in$")
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pool("drain", queue, lo=1)))
        match = wait_for(
            lambda: next((m for line in operator.logs().splitlines() if (m := drained_line.match(line))), None),
            timeout=60, message="a drain before the scale-in",
        )  # fmt: skip
        # A few more tasks arrive after the decision.
        target = sent + 6
        wait_for(lambda: sent >= target, timeout=30, message="tasks keep arriving")
    finally:
        stop.set()
        producer.join(timeout=10)
    wait_for(lambda: len({r["id"] for r in _records(redis_db, "plain:done")}) == sent, timeout=60,
             message=lambda: f"{sent} tasks done (have {redis_db.llen('plain:done')})")  # fmt: skip
    stamp, millis = match.group(1).split(",")
    # The log's local time, to the millisecond; a message taken just before the drain starts at once.
    drained_at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000 + 0.3
    drained = set(match.group(2).split(", "))
    late = [r for r in _records(redis_db, "plain:started") if r["worker"] in drained and r["at"] > drained_at]
    account = _account(redis_db, sent)
    print(f"drain: {sorted(drained)} drained; {sent} tasks sent, {account}; started there after: {len(late)}")
    assert not late, late
    # A message a chosen worker took in the moment between the census and the drain, and had not
    # started, goes back to the queue at its warm shutdown (kombu marks it redelivered): never run twice.
    assert (account["lost"], account["started_twice"], account["killed"]) == (0, 0, 0), account


def test_look_alike_pod_with_copied_labels_is_never_annotated_drained_or_counted(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """Another tenant of the namespace copies a tier pod (labels and all) and keeps its worker busy:
    it is not ours (no ReplicaSet of our Deployment controls it), so it neither holds the tier up
    nor gets a deletion cost or a drain."""
    queue = _queue(namespace)
    core = client.CoreV1Api(k8s_api)
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("own", queue, lo=2))
    ours = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and len(p) == 2 and sorted(p), timeout=180,
                    message="two ready workers")  # fmt: skip
    model = json.loads(cluster.kubectl("get", "pod", "-n", namespace, ours[0], "-o", "json").stdout)
    other = f"{queue}-other"
    container = {**model["spec"]["containers"][0]}
    container["args"] = [other if a == queue else a for a in container.get("args") or []]
    look_alike = {
        # Every label but pod-template-hash: with it, our ReplicaSet would adopt the orphan (and delete it).
        "metadata": {"name": "lookalike", "labels": {k: v for k, v in model["metadata"]["labels"].items()
                                                     if k != "pod-template-hash"}},
        # The same container (probes, env from the same Secret), on kwok's node (its taint keeps the scheduler off).
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 5,
                 "nodeName": model["spec"]["nodeName"]},
    }  # fmt: skip
    core.create_namespaced_pod(namespace, look_alike)
    wait_for(lambda: "lookalike" in _ready_pids(k8s_api, namespace), timeout=120,
             message=lambda: f"the look-alike worker is ready: {core.read_namespaced_pod('lookalike', namespace)}; "
             f"localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
    _send(redis_server.url, other, 1, 25.0)
    wait_for(lambda: any(r["worker"] == "lookalike" for r in _records(redis_db, "plain:started")), timeout=30,
             message="the look-alike runs a task")  # fmt: skip

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pool("own", queue, lo=0)))
    apps = client.AppsV1Api(k8s_api)
    wait_for(
        lambda: apps.read_namespaced_deployment("own-work", namespace).spec.replicas == 0,
        timeout=60,
        message=lambda: f"our two idle workers go; events {[e.message for e in _events(k8s_api, namespace, 'own')]}",
    )
    pod = core.read_namespaced_pod("lookalike", namespace)
    assert "controller.kubernetes.io/pod-deletion-cost" not in (pod.metadata.annotations or {})
    assert pod.metadata.deletion_timestamp is None
    scaled = [e.message for e in _events(k8s_api, namespace, "own") if e.reason in ("ScaledDown", "ScaleDownHeld")]
    assert scaled and not any("busy" in m or "lookalike" in m for m in scaled), scaled
    drains = [line for line in operator.logs().splitlines() if f"{namespace}/own: tier work: drained" in line]
    assert not any("lookalike" in line for line in drains), drains
    status = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "own")
    assert status["status"]["tiers"][0].get("busyWorkers", 0) == 0
    wait_for(lambda: len(_records(redis_db, "plain:done")) == 1, timeout=60, message="the look-alike's task ends")
    account = _account(redis_db, 1)
    print(f"look-alike: replicas 2 -> 0 with a busy look-alike; its task {account}")
    assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account


def test_unacked_of_sigkilled_workers_is_stale_past_the_visibility_timeout_and_holds_no_replicas(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """acks_late, a 6 s visibility timeout in the app and the pool: two workers each run a task and
    are SIGKILLed. Their `unacked` entries belong to no live worker; past the timeout they are
    reported stale, and the tier keeps one worker (kombu restores them only from a live consumer),
    not two. We never write to Redis: kombu restores them and every task finishes."""
    # Each first run holds its worker until the kill; a rerun is shorter than the timeout, so kombu
    # never restores a message while a live worker runs it.
    queue, vt = _queue(namespace), 6
    fast = {"scaleDownStabilizationSeconds": 0, "cooldownSeconds": 1}
    _setup(cluster, k8s_api, namespace, redis_server.url,
           _pool("stale", queue, acks_late=True, hi=2, visibility_timeout=vt, **fast))  # fmt: skip
    watcher = Watcher(k8s_api, namespace, "stale-work")
    watcher.start()
    custom = client.CustomObjectsApi(k8s_api)
    try:
        _send(redis_server.url, queue, 2, 120.0, again=1.0)
        wait_for(lambda: len({r["worker"] for r in _records(redis_db, "plain:started")}) == 2, timeout=120,
                 message=lambda: f"two workers run a task; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
        running = {r["worker"] for r in _records(redis_db, "plain:started")}
        pids = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and running <= set(p) and p, timeout=30,
                        message="the running workers' pids")  # fmt: skip
        for pod in running:
            os.kill(pids[pod], signal.SIGKILL)  # the main process; localrun takes its pool child with it
        killed_at = time.time()

        def stale_shown() -> dict[str, Any] | None:
            pool = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stale")
            tier = next(iter((pool.get("status") or {}).get("tiers") or []), {})
            return tier if tier.get("staleUnacked") == 2 else None

        tier = wait_for(stale_shown, timeout=60, message="status shows 2 stale unacked")
        metric = f'celery_fleet_tier_stale_unacked_messages{{namespace="{namespace}",pool="stale",tier="work"}} 2.0'
        assert metric in operator.metrics()
        wait_for(
            lambda: len({r["id"] for r in _records(redis_db, "plain:done")}) == 2,
            timeout=120,
            message=lambda: f"kombu restored both and they finished (done {redis_db.llen('plain:done')})",
        )
    finally:
        timeline = watcher.stop()
    account = _account(redis_db, 2)
    replicas = [n for _, n in timeline.replicas]
    print(f"stale unacked: status {tier}; replicas {replicas}; tasks {account}")
    assert (tier["inFlight"], tier["desiredReplicas"]) == (0, 1), tier
    assert any(n == 1 for t, n in timeline.replicas if t > killed_at), timeline.replicas  # not held at 2
    # Both ran again from their restored messages; nothing lost, nothing run twice to the end.
    assert account["lost"] == 0 and account["redelivered"] == 2, account
    done = _records(redis_db, "plain:done")
    assert len(done) == len({r["id"] for r in done}) == 2, done


def _condition(k8s_api: client.ApiClient, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    pool = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_remote_control_off_is_a_condition_not_stalled_and_clears_when_workers_answer(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    queue = _queue(namespace)
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("rc", queue, lo=1, remote_control=False))
    (mute,) = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and len(p) == 1 and list(p), timeout=120,
                       message="one ready worker")  # fmt: skip
    apps = client.AppsV1Api(k8s_api)
    apply = lambda pool: cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))  # noqa: E731
    apply(_pool("rc", queue, lo=0, remote_control=False))  # a scale-down: its worker is asked, and cannot answer
    off = wait_for(lambda: (c := _condition(k8s_api, namespace, "rc", "RemoteControl")) and c["status"] == "False"
                   and c, timeout=60, message="RemoteControl=False")  # fmt: skip
    assert off["reason"] == "RemoteControlOff" and "worker_enable_remote_control" in off["message"], off
    assert "queue depth alone" in off["message"], off  # what the operator does instead
    stalled = _condition(k8s_api, namespace, "rc", "Stalled")
    assert stalled is not None and stalled["status"] == "False", stalled  # the pool still works
    # Scaled as if idle (today's behaviour without remote control).
    wait_for(lambda: apps.read_namespaced_deployment("rc-work", namespace).spec.replicas == 0
             and not _ready_pids(k8s_api, namespace), timeout=60, message="scaled to 0")  # fmt: skip
    # Remote control on again: the next scale-down's workers answer, and the condition clears.
    apply(_pool("rc", queue, lo=1))
    wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and mute not in p, timeout=120,
             message="a worker that answers")  # fmt: skip
    apply(_pool("rc", queue, lo=0))
    on = wait_for(lambda: (c := _condition(k8s_api, namespace, "rc", "RemoteControl")) and c["status"] == "True"
                  and c, timeout=60, message="RemoteControl=True once the workers answer")  # fmt: skip
    print(f"remote control: {off['reason']}: {off['message']}; then {on['reason']}")
    assert on["reason"] == "Answering"


# -- issue 23: the protocol recorded on the pods


def _consuming(url: str, pods: list[str], queue: str) -> dict[str, bool]:
    """Pod -> whether its worker consumes `queue` now (`inspect active_queues`, JSON replies only)."""
    app = Celery("probe", broker=url)
    app.conf.accept_content = ["json"]
    app.conf.broker_connection_retry_on_startup = False
    try:
        replies = app.control.inspect(destination=[f"celery@{p}" for p in pods], timeout=1.5).active_queues() or {}
    finally:
        app.close()
    return {p: any(q.get("name") == queue for q in replies.get(f"celery@{p}") or []) for p in pods}


def _marked(k8s_api: client.ApiClient, namespace: str) -> dict[str, str]:
    pods = client.CoreV1Api(k8s_api).list_namespaced_pod(namespace, label_selector="celeryfleet.io/scale-in").items
    return {p.metadata.name: p.metadata.labels["celeryfleet.io/scale-in"] for p in pods}


@pytest.fixture
def own_namespace(cluster: Cluster, crds_installed: list[str]) -> Iterator[str]:
    """A namespace the session's operator does not watch: this test runs (and kills) its own."""
    import uuid

    name = f"si-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             timeout=30, message=f"default ServiceAccount in {name}")  # fmt: skip
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("moment", ["first-mark", "busy-candidate-kept-drained"])
def test_operator_sigkilled_mid_drain_then_restarted_every_live_worker_consumes_within_15s(
    cluster: Cluster, k8s_api: client.ApiClient, own_namespace: str, redis_server: RedisServer, redis_db: Any,
    tmp_path: Path, moment: str,
) -> None:  # fmt: skip
    """first-mark: killed the moment the first candidates are marked (drained or about to be).
    busy-candidate-kept-drained: a task sent the moment the census goes out is taken by a worker that
    answered idle; the census after the drain keeps it, drained; the operator is killed then, with that
    worker consuming nothing. Either way the restarted operator gives the queues back within 15 s."""
    namespace, queue = own_namespace, _queue(own_namespace)
    localrun = LocalRuntime(cluster, namespace, tmp_path, pythonpath=ROOT / "tests" / "support")
    first = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "operator-1.log")
    second = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "operator-2.log")
    sent = 0
    try:
        first.start()
        _setup(cluster, k8s_api, namespace, redis_server.url, _pool("kill", queue, lo=3, hi=3, grace=5))
        wait_for(lambda: len(_ready_pids(k8s_api, namespace)) == 3, timeout=120,
                 message=lambda: f"three ready workers; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
        scale_in = json.dumps(_pool("kill", queue, lo=0, hi=3, grace=5))
        if moment == "first-mark":
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=scale_in)
            marked = wait_for(lambda: _marked(k8s_api, namespace) or None, timeout=60, interval=0.02,
                              message="the operator marks its scale-in candidates")  # fmt: skip
        else:
            with redis_db.monitor() as m:
                cluster.kubectl("apply", "-n", namespace, "-f", "-", input=scale_in)
                for command in m.listen():  # the census's first broadcast
                    if "PUBLISH" in command["command"] and "pidbox" in command["command"]:
                        break
            _send(redis_server.url, queue, 1, 25.0)
            sent = 1

            def kept_drained() -> dict[str, str] | None:
                marks = _marked(k8s_api, namespace)
                live = _ready_pids(k8s_api, namespace)
                if len(marks) == 1 and set(marks) <= set(live) and not any(_consuming(redis_server.url, list(marks),
                                                                                    queue).values()):  # fmt: skip
                    return marks
                return None

            marked = wait_for(kept_drained, timeout=60, interval=0.2,
                              message=lambda: f"one busy candidate kept drained (marks {_marked(k8s_api, namespace)});"
                              f" operator:\n{first.logs()[-2000:]}")  # fmt: skip
        first.kill()
        drained_then = {p: c for p, c in _consuming(redis_server.url, list(marked), queue).items() if not c}
        # The tier should keep its workers now; nothing may wait behind a drained one.
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(_pool("kill", queue, lo=3, hi=3, grace=5))
        )
        second.start()
        restarted = time.monotonic()

        def all_consume() -> dict[str, bool] | None:
            live = sorted(_ready_pids(k8s_api, namespace))
            seen = _consuming(redis_server.url, live, queue)
            return seen if live and all(seen.values()) and not _marked(k8s_api, namespace) else None

        seen = wait_for(all_consume, timeout=15, interval=0.5,
                        message=lambda: f"every live worker consumes {queue}, no mark left "
                        f"(marks {_marked(k8s_api, namespace)}); operator:\n{second.logs()[-2000:]}")  # fmt: skip
        took = time.monotonic() - restarted
        _send(redis_server.url, queue, 3, 3.0)
        wait_for(lambda: len(_records(redis_db, "plain:done")) == sent + 3, timeout=60, message="the tasks done")
        account = _account(redis_db, sent + 3)
        print(f"sigkill at {moment}: marks {marked}, drained then {sorted(drained_then)}; after restart all "
              f"consume in {took:.1f}s {seen}; {account}")  # fmt: skip
        assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account
        if moment != "first-mark":
            assert drained_then, "the kept candidate consumed nothing when the operator died"
    finally:
        second.stop()
        first.stop()
        localrun.stop()


def _pidbox_publishes(command: dict[str, Any]) -> bool:
    return "PUBLISH" in command["command"] and "pidbox" in command["command"]


@pytest.mark.parametrize("step", ["before-census", "during-census-one-silent", "census-to-drain", "drain-to-scale"])
def test_task_sent_at_each_step_of_a_scale_in_is_done_once(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime, step: str,
) -> None:  # fmt: skip
    """Four idle workers, min 4 -> 0, a 20 s task (longer than the 5 s grace period) sent at one step of
    the scale-in: before the census; the moment its first broadcast goes out, one worker SIGSTOPped (a
    GC pause: the census waits for it to its deadline), so an idle worker that already answered
    "nothing" takes it; once the candidates are marked (between the census and the drain); after the
    drain's broadcast (before the scale). Whoever takes it keeps its pod until it is done."""
    queue = _queue(namespace)
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("mid", queue, lo=4, grace=5))
    pids = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and len(p) == 4 and p, timeout=180,
                    message="four ready workers")  # fmt: skip
    silent = sorted(pids)[0] if step == "during-census-one-silent" else None
    if silent:
        os.kill(pids[silent], signal.SIGSTOP)
    scale_in = json.dumps(_pool("mid", queue, lo=0, grace=5))
    try:
        if step == "before-census":
            _send(redis_server.url, queue, 1, 20.0)
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=scale_in)
        elif step == "census-to-drain":
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=scale_in)
            wait_for(lambda: _marked(k8s_api, namespace) or None, timeout=60, interval=0.02, message="marks")
            _send(redis_server.url, queue, 1, 20.0)
        else:
            # The census sends active, reserved, scheduled; the drain's cancel_consumer is the next one.
            wanted = 1 if step == "during-census-one-silent" else 4
            with redis_db.monitor() as m:
                cluster.kubectl("apply", "-n", namespace, "-f", "-", input=scale_in)
                seen = 0
                for command in m.listen():
                    seen += _pidbox_publishes(command)
                    if seen >= wanted:
                        break
            _send(redis_server.url, queue, 1, 20.0)
        sent_at = time.time()
        wait_for(lambda: len(_records(redis_db, "plain:started")) == 1, timeout=30, message="the task starts")
        started = _records(redis_db, "plain:started")[0]
        wait_for(lambda: len(_records(redis_db, "plain:done")) == 1, timeout=60,
                 message=lambda: f"the task done; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
        deployment = client.AppsV1Api(k8s_api).read_namespaced_deployment("mid-work", namespace)
        late = started["at"] - sent_at
        print(f"{step}: task on {started['worker']} at +{late:.2f}s, replicas {deployment.spec.replicas}")
    finally:
        if silent:
            os.kill(pids[silent], signal.SIGCONT)
    account = _account(redis_db, 1)
    if step == "census-to-drain":
        # A message a marked worker's BRPOP took in the instant its cancel_consumer arrived finds no consumer:
        # kombu puts it back on the queue at once, flagged redelivered (seen once in two runs); it runs once.
        assert account["redelivered"] <= 1, account
        account["redelivered"] = 0
    assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account
    assert "SIGKILL" not in localrun.logs()


def test_four_60s_tasks_on_a_0_to_4_tier_all_done_in_about_70s_no_pod_started_for_nothing(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """The issue's prefetch case, with workers that fetch only when a process is free (disablePrefetch,
    Celery 5.6+): the scaler keeps the four busy workers (their running tasks are in no Redis key) and
    starts no pod it then removes unused."""
    queue = _queue(namespace)
    pool = _pool("four", queue, lo=0, hi=4, grace=5)
    pool["spec"]["tiers"][0]["disablePrefetch"] = True
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)
    wait_for(lambda: client.AppsV1Api(k8s_api).read_namespaced_deployment("four-work", namespace), timeout=60,
             message="the tier Deployment")  # fmt: skip
    watcher = Watcher(k8s_api, namespace, "four-work")
    watcher.start()
    try:
        sent_at = time.time()
        _send(redis_server.url, queue, 4, 60.0)
        wait_for(lambda: len(_records(redis_db, "plain:done")) == 4, timeout=110,
                 message=lambda: f"4 tasks done (have {redis_db.llen('plain:done')}); replicas "
                 f"{[n for _, n in watcher.seen.replicas]}")  # fmt: skip
        done_in = max(r["at"] for r in _records(redis_db, "plain:done")) - sent_at
    finally:
        timeline = watcher.stop()
    ran = {r["worker"] for r in _records(redis_db, "plain:started")}
    unused = sorted(p for p in timeline.pods_gone if p not in ran)
    account = _account(redis_db, 4)
    print(f"four 60 s tasks: all done in {done_in:.1f}s; replicas {[n for _, n in timeline.replicas]}; "
          f"pods started {len(timeline.pods_seen)}, removed unused {unused}; {account}")  # fmt: skip
    assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account
    assert done_in <= 75, done_in
    assert not unused, unused


def test_orphans_of_sigkilled_workers_ask_for_one_worker_within_one_census_not_one_hour(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """acks_late, kombu's default 1 h visibility timeout: two workers each run a task and are SIGKILLed.
    Their `unacked` entries are nobody's (the restarted workers answer that they hold nothing), long
    before they are stale: reported as orphaned, and they keep one worker, not two."""
    queue = _queue(namespace)
    fast = {"scaleDownStabilizationSeconds": 0, "cooldownSeconds": 1}
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("orph", queue, acks_late=True, hi=2, **fast))
    watcher = Watcher(k8s_api, namespace, "orph-work")
    watcher.start()
    try:
        _send(redis_server.url, queue, 2, 300.0)
        wait_for(lambda: len({r["worker"] for r in _records(redis_db, "plain:started")}) == 2, timeout=120,
                 message=lambda: f"two workers run a task; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
        running = {r["worker"] for r in _records(redis_db, "plain:started")}
        pids = wait_for(lambda: (p := _ready_pids(k8s_api, namespace)) and running <= set(p) and p, timeout=30,
                        message="the running workers' pids")  # fmt: skip
        for pod in running:
            os.kill(pids[pod], signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: any(n == 1 for t, n in watcher.seen.replicas if t > killed_at), timeout=60,
                 message=lambda: f"back to one worker (replicas {watcher.seen.replicas[-3:]}); operator:\n"
                 f"{operator.logs()[-1500:]}")  # fmt: skip
        back_in = next(t for t, n in watcher.seen.replicas if t > killed_at and n == 1) - killed_at
    finally:
        timeline = watcher.stop()
    scaled = [e.message for e in _events(k8s_api, namespace, "orph") if e.reason == "ScaledDown"]
    print(f"orphans: back to 1 in {back_in:.1f}s after the kill; replicas {[n for _, n in timeline.replicas]}; "
          f"{scaled[-1:]}; unacked {redis_db.hlen('unacked')}")  # fmt: skip
    assert any("orphaned" in m for m in scaled), scaled
    assert redis_db.hlen("unacked") == 2  # never written by us: kombu restores them after the timeout
    started = _records(redis_db, "plain:started")
    assert len(started) == 2 and not any(r["redelivered"] for r in started)


def test_countdown_tasks_on_a_min_0_tier_no_cycling_and_a_revoked_one_never_runs(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """30 countdown tasks (due in 45 s) on a min-0 tier with a fast cooldown: the worker holding them is
    never removed (that would requeue them and start pods again: the issue's 1 -> 0 -> 3 -> 1 cycle, and
    forget the revoke it got); one of them is revoked while held and never runs. At most 2 pod starts."""
    queue = _queue(namespace)
    fast = {"targetDepthPerReplica": 30, "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 1}
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("cd", queue, lo=0, hi=4, **fast))
    wait_for(lambda: client.AppsV1Api(k8s_api).read_namespaced_deployment("cd-work", namespace), timeout=60,
             message="the tier Deployment")  # fmt: skip
    watcher = Watcher(k8s_api, namespace, "cd-work")
    watcher.start()
    app = Celery("producer", broker=redis_server.url)
    app.conf.broker_connection_retry_on_startup = False
    try:
        with app.connection_for_write() as conn:
            ids = [app.send_task("plainapp.hold", args=[0.1], queue=queue, connection=conn, countdown=45).id
                   for _ in range(30)]  # fmt: skip
        wait_for(lambda: redis_db.hlen("unacked") == 30, timeout=60, message="a worker holds all 30")
        app.control.revoke(ids[0])  # every live worker keeps it in memory (no mingle, no statedb)
        wait_for(
            lambda: len(_records(redis_db, "plain:done")) == 29,
            timeout=120,
            message=lambda: f"29 done (have {redis_db.llen('plain:done')}); replicas {watcher.seen.replicas}",
        )
        wait_for(lambda: watcher.seen.replicas[-1][1] == 0, timeout=60, message="back to 0 once they ran")
    finally:
        timeline = watcher.stop()
        app.close()
    replicas = [n for _, n in timeline.replicas]
    ran = {r["id"] for r in _records(redis_db, "plain:started")}
    print(f"countdown on min 0: replicas {replicas}; pods started {len(timeline.pods_seen)}; ran {len(ran)}")
    assert ids[0] not in ran
    assert len(ran) == 29 and not any(r["redelivered"] for r in _records(redis_db, "plain:started"))
    assert len(timeline.pods_seen) <= 2, timeline.pods_seen
    assert replicas.count(0) <= 2, replicas  # 0 at the start and at the end: never in between


def test_busy_worker_cut_off_from_redis_for_45s_keeps_its_task_and_its_pod(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    """The worker reaches the same Redis as its own ACL user; the test locks that user out for 45 s (its
    connections killed, reconnects refused) while its 70 s task runs: the pod goes NotReady (the probe
    sees no broker connection), the operator still reads the queues, and wants 0. A NotReady pod that
    runs is asked, and silent means busy: the pod stays and the task finishes."""
    queue = _queue(namespace)
    user = f"w{namespace[-6:]}"
    redis_db.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all")
    pool = _pool("cut", queue, lo=1, hi=2, grace=5, cooldownSeconds=1, scaleDownStabilizationSeconds=0)
    pool["spec"]["env"].append({"name": "PLAIN_BROKER_URL",
                                "value": f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"})  # fmt: skip
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)
    wait_for(lambda: len(_ready_pids(k8s_api, namespace)) == 1, timeout=120, message="one ready worker")
    _send(redis_server.url, queue, 1, 70.0)
    wait_for(lambda: _records(redis_db, "plain:started"), timeout=30, message="the task starts")
    worker = _records(redis_db, "plain:started")[0]["worker"]
    watcher = Watcher(k8s_api, namespace, "cut-work")
    watcher.start()
    try:
        redis_db.execute_command("ACL", "SETUSER", user, "off")
        redis_db.execute_command("CLIENT", "KILL", "USER", user)
        cut_at = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({**pool, "spec": {
            **pool["spec"], "tiers": [{**pool["spec"]["tiers"][0], "replicas": {"min": 0, "max": 2}}]}}))  # fmt: skip
        wait_for(lambda: worker not in _ready_pids(k8s_api, namespace), timeout=30, message="the pod NotReady")
        not_ready_at = time.monotonic() - cut_at
        # The operator asks (and hears nothing) while the worker is cut off; it never removes it.
        shown: list[Any] = []

        def record_status() -> bool:
            pool_now = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                                       PLURAL, "cut")  # fmt: skip
            tier = next(iter((pool_now.get("status") or {}).get("tiers") or []), {})
            seen = (tier.get("desiredReplicas"), tier.get("busyWorkers"), tier.get("inFlight"))
            if not shown or shown[-1] != seen:
                shown.append(seen)
            return time.monotonic() - cut_at >= 45

        wait_for(record_status, timeout=60, interval=1.0, message="45 s")
        print(f"status during the cut (desired, busy, in flight): {shown}")
        pods = {p.metadata.name for p in client.CoreV1Api(k8s_api).list_namespaced_pod(namespace).items
                if not p.metadata.deletion_timestamp}  # fmt: skip
        assert worker in pods, pods
    finally:
        redis_db.execute_command("ACL", "SETUSER", user, "on")
    wait_for(lambda: len(_records(redis_db, "plain:done")) == 1, timeout=60,
             message=lambda: f"the task done; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
    wait_for(lambda: watcher.seen.replicas and watcher.seen.replicas[-1][1] == 0, timeout=60,
             message="scaled to 0 once it finished")  # fmt: skip
    timeline = watcher.stop()
    account = _account(redis_db, 1)
    scaled = [e.message for e in _events(k8s_api, namespace, "cut") if e.reason in ("ScaledDown", "ScaleDownHeld")]
    print(f"cut off 45 s: NotReady after {not_ready_at:.1f}s; replicas {[n for _, n in timeline.replicas]}; "
          f"{account}; {scaled[:2]}")  # fmt: skip
    assert account == {"lost": 0, "started_twice": 0, "redelivered": 0, "killed": 0}, account
    # Asked while NotReady and cut off, and counted busy for its silence (not taken for idle).
    assert shown and all(busy == 1 for _, busy, _ in shown), shown
