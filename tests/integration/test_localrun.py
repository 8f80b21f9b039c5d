"""Issue 8: the local runtime runs real `celery worker` processes for the operator's pods.

The real operator scales a tier from Redis depth; `celery-fleet localrun` (development only)
runs one process per pod of the demo app (demo/demoapp), SIGTERMs a removed pod's process (a
warm shutdown), restarts a killed one, and reports readiness back into the pods.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kubernetes import client

from celery_fleet_localrun.cluster import RUN_LABELS
from tests.support.cluster import Cluster
from tests.support.local_runtime import LocalRuntime
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
SEP = "\x06\x16"
PID_IN_MESSAGE = re.compile(r"worker: pid (\d+), connected to the broker")


@pytest.fixture
def localrun(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(cluster, namespace, tmp_path)
    yield runtime
    runtime.stop()
    assert runtime.proc.returncode == 0, runtime.logs()[-3000:]


def _pool(name: str, **tier: Any) -> dict[str, Any]:
    knobs = {"targetDepthPerReplica": 4, "scaleDownStabilizationSeconds": 2, "scaleDownPeriodSeconds": 1,
             "scaleDownMaxStep": 10}  # fmt: skip
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "demoapp",
            "image": "local/celery-fleet-demo:dev",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
            "podLabels": RUN_LABELS,
            "tiers": [
                {"name": "high", "queues": ["high_priority"], "concurrency": 2, "pool": "threads",
                 "terminationGracePeriodSeconds": 30, "replicas": {"min": 1, "max": 3}, "autoscaling": knobs,
                 **tier},
            ],
        },
    }  # fmt: skip


def _setup(cluster: Cluster, k8s_api: client.ApiClient, namespace: str, redis_url: str, pool: dict[str, Any]) -> None:
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": redis_url}}
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))


def _producer(url: str) -> Celery:
    app = Celery("producer", broker=url)
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    app.conf.broker_connection_retry_on_startup = False
    return app


def _send(url: str, count: int, duration: float) -> None:
    producer = _producer(url)
    with producer.connection_for_write() as conn:
        for i in range(count):
            producer.send_task("demoapp.work", args=[duration], kwargs={"sent_at": time.time()},
                               queue="high_priority", priority=[0, 3, 6, 9][i % 4], connection=conn)  # fmt: skip


def _pods(k8s_api: client.ApiClient, namespace: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(k8s_api).list_namespaced_pod(namespace, label_selector=f"{GROUP}/tier=high").items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def _local_pids(k8s_api: client.ApiClient, namespace: str) -> dict[str, int]:
    """Pod name -> pid of its worker, for pods the local runtime reports Ready (connected)."""
    pids = {}
    for pod in _pods(k8s_api, namespace):
        ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
        if ready is not None and ready.status == "True" and ready.reason == "LocalProcessReady":
            match = PID_IN_MESSAGE.search(ready.message or "")
            if match:
                pids[pod.metadata.name] = int(match.group(1))
    return pids


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _deployment(k8s_api: client.ApiClient, namespace: str, name: str) -> client.V1Deployment:
    return client.AppsV1Api(k8s_api).read_namespaced_deployment(name, namespace)


def _records(redis_db: Any, key: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis_db.lrange(key, 0, -1)]


def _depth(redis_db: Any, queue: str) -> int:
    return sum(int(redis_db.llen(queue if s == 0 else f"{queue}{SEP}{s}")) for s in (0, 3, 6, 9))


def test_burst_gets_real_workers_that_drain_the_queue(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    # A long stabilization keeps the tier at 3 after the drain, so all three workers come up even
    # when pods start slowly on a loaded machine.
    pool = _pool("lr")
    pool["spec"]["tiers"][0]["autoscaling"]["scaleDownStabilizationSeconds"] = 30
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)

    # One real worker for the tier's minimum, reported Ready only once it holds a broker connection.
    first = wait_for(lambda: _local_pids(k8s_api, namespace) or None, timeout=180,
                     message=lambda: f"a ready worker process; localrun log:\n{localrun.logs()[-2000:]}")  # fmt: skip
    ((pod_name, pid),) = first.items()
    argv = _cmdline(pid)
    assert "worker" in argv and f"celery@{pod_name}" in argv, argv
    assert argv[argv.index("-A") + 1] == "demoapp"
    wait_for(lambda: _deployment(k8s_api, namespace, "lr-high").status.ready_replicas == 1, timeout=30,
             message="the Deployment counts the real worker as ready")  # fmt: skip

    _send(redis_server.url, 16, 5.0)  # 16 queued / target 4 -> 4, capped at 3 replicas; 40 s for one worker

    def three_real_workers() -> dict[str, int] | None:
        pids = _local_pids(k8s_api, namespace)
        return pids if len(pids) == 3 else None

    pids = wait_for(three_real_workers, timeout=180,
                    message=lambda: f"3 ready worker processes; localrun log:\n{localrun.logs()[-2000:]}")  # fmt: skip
    assert len(set(pids.values())) == 3
    for name, worker_pid in pids.items():
        assert f"celery@{name}" in _cmdline(worker_pid)

    done = wait_for(lambda: (r := _records(redis_db, "demo:done")) and len(r) == 16 and r, timeout=120,
                    message=lambda: f"16 tasks done (have {redis_db.llen('demo:done')})")  # fmt: skip
    assert _depth(redis_db, "high_priority") == 0
    workers = {r["worker"] for r in done}
    # Real workers of this tier's pods did the work, more than one of them.
    assert workers <= set(pids) | {pod_name}, workers
    assert len(workers) >= 2, workers

    # Drained: the tier steps down to its minimum and the surplus processes are stopped.
    wait_for(lambda: len(_pods(k8s_api, namespace)) == 1, timeout=120, message="stepped down to 1 pod")
    survivor = wait_for(lambda: _local_pids(k8s_api, namespace) or None, timeout=30, message="one ready worker")
    for name, worker_pid in pids.items():
        if name not in survivor:
            wait_for(lambda p=worker_pid: not Path(f"/proc/{p}").exists(), timeout=40,  # type: ignore[misc]
                     message=f"worker process {worker_pid} of removed pod {name} exited")  # fmt: skip


def test_scale_down_sigterms_a_busy_worker_which_finishes_its_tasks(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("warm"))
    wait_for(lambda: _local_pids(k8s_api, namespace) or None, timeout=180, message="the first worker is ready")

    _send(redis_server.url, 8, 8.0)  # 8 / target 4 -> 2 replicas, each running 2 tasks of 8 s

    def both_workers_busy() -> dict[str, int] | None:
        pids = _local_pids(k8s_api, namespace)
        started = {r["worker"] for r in _records(redis_db, "demo:started")}
        return pids if len(pids) == 2 and set(pids) <= started else None

    pids = wait_for(
        both_workers_busy, timeout=180, message=lambda: f"two busy workers; log:\n{localrun.logs()[-2000:]}"
    )

    # Lower the tier's max: a hard cap, applied at once, so a busy worker's pod is removed.
    cut_at = time.time()
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "celeryworkerpools", "warm",
        {"spec": {"tiers": [_pool("warm", replicas={"min": 1, "max": 1})["spec"]["tiers"][0]]}},
    )  # fmt: skip
    wait_for(lambda: len(_pods(k8s_api, namespace)) == 1, timeout=120, message="scaled to 1 pod")
    (kept,) = (p.metadata.name for p in _pods(k8s_api, namespace))
    (removed,) = set(pids) - {kept}
    removed_pid = pids[removed]

    wait_for(lambda: not Path(f"/proc/{removed_pid}").exists(), timeout=40,
             message=f"the removed pod's worker {removed_pid} exited")  # fmt: skip
    started_there = [r for r in _records(redis_db, "demo:started") if r["worker"] == removed]
    done_there = [r for r in _records(redis_db, "demo:done") if r["worker"] == removed]
    assert started_there, "the removed worker had tasks running"
    # Warm shutdown: every task the removed worker had started ran to completion, after the cut.
    assert sorted(r["id"] for r in done_there) == sorted(r["id"] for r in started_there)
    assert max(r["finished"] for r in done_there) > cut_at
    logs = localrun.logs()
    assert re.search(rf"pod {namespace}/{removed}: container worker pid {removed_pid} exited with 0 "
                     r"[\d.]+s after SIGTERM \(warm shutdown\)", logs), logs[-3000:]  # fmt: skip
    assert "SIGKILL" not in logs

    # Nothing lost: the prefetched-but-unstarted messages went back to the queue and ran on the survivor.
    wait_for(lambda: redis_db.llen("demo:done") == 8, timeout=120, message="all 8 tasks done")
    assert len({r["id"] for r in _records(redis_db, "demo:done")}) == 8


def test_killed_worker_is_restarted_and_its_restart_reported(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("crash"))
    (pod_name, pid), = wait_for(lambda: _local_pids(k8s_api, namespace) or None, timeout=180,
                                message="the first worker is ready").items()  # fmt: skip

    os.kill(pid, signal.SIGKILL)

    def restarted() -> client.V1ContainerStatus | None:
        pod = client.CoreV1Api(k8s_api).read_namespaced_pod(pod_name, namespace)
        status = (pod.status.container_statuses or [None])[0]
        new_pid = _local_pids(k8s_api, namespace).get(pod_name)
        # Ready comes a probe period after the restart is reported: wait for both.
        return status if status and status.restart_count == 1 and status.ready and new_pid and new_pid != pid else None

    status = wait_for(restarted, timeout=90, message=lambda: f"a restarted worker; log:\n{localrun.logs()[-2000:]}")
    assert status.last_state.terminated.exit_code == 137

    # The restarted worker really works.
    _send(redis_server.url, 1, 0.1)
    wait_for(lambda: redis_db.llen("demo:done") == 1, timeout=30, message="a task done by the restarted worker")
    assert _records(redis_db, "demo:done")[0]["worker"] == pod_name


def test_missing_secret_is_reported_on_the_pod_until_it_appears(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,
) -> None:  # fmt: skip
    pool = _pool("late")
    pool["spec"]["env"] = [{"name": "APP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-extra", "key": "token"}}}]
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)

    def config_error() -> client.V1ContainerStatus | None:
        for pod in _pods(k8s_api, namespace):
            status = (pod.status.container_statuses or [None])[0]
            if status and status.state.waiting and status.state.waiting.reason == "CreateContainerConfigError":
                return status
        return None

    status = wait_for(config_error, timeout=180, message=lambda: f"CreateContainerConfigError; log:\n{localrun.logs()}")
    assert status.state.waiting.message == f'secret "app-extra" not found in namespace {namespace}'
    ready = next(c for c in _pods(k8s_api, namespace)[0].status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "LocalProcessNotRunning")

    token = secrets.token_hex(8)
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "app-extra"}, "stringData": {"token": token}}
    )
    pids = wait_for(lambda: _local_pids(k8s_api, namespace) or None, timeout=60, message="ready once the Secret exists")
    (pid,) = pids.values()
    environ = dict(
        line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in line
    )
    # Both Secret references resolved into the process's environment, never into the runtime's log.
    assert environ["APP_TOKEN"] == token
    assert environ["CELERY_BROKER_URL"] == redis_server.url
    assert token not in localrun.logs() and redis_server.url not in localrun.logs()
