"""Issue 8: a CeleryBeat with a standby, run by the local runtime: one real `celery beat`, failover.

The elector (copied by the pod's init container, as in a cluster) talks to the apiserver with the
pod's own ServiceAccount token, so the beat's Role is what lets it hold the Lease.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from celery_fleet_localrun.cluster import RUN_LABELS
from tests.integration.test_localrun import LocalRuntime, localrun  # noqa: F401 (the fixture)
from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
PID_IN_MESSAGE = re.compile(r"beat: pid (\d+), running")
TICK_SECONDS = 5.0  # demoapp's beat_schedule


def _manifests(redis_url: str) -> list[dict[str, Any]]:
    broker = {"urlSecretRef": {"name": "broker", "key": "url"}}
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "broker"}, "stringData": {"url": redis_url}},
        # A worker to run the ticks, so each tick beat sends leaves a record.
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CeleryWorkerPool", "metadata": {"name": "ticks"},
         "spec": {"app": "demoapp", "image": "local/celery-fleet-demo:dev", "broker": broker,
                  "podLabels": RUN_LABELS,
                  "tiers": [{"name": "medium", "queues": ["medium_priority"], "concurrency": 2, "pool": "threads",
                             "replicas": {"min": 1, "max": 1}}]}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CeleryBeat", "metadata": {"name": "demo"},
         "spec": {"app": "demoapp", "image": "local/celery-fleet-demo:dev", "broker": broker, "standby": 1,
                  "podLabels": RUN_LABELS,
                  "lease": {"durationSeconds": 8, "renewDeadlineSeconds": 5, "retryPeriodSeconds": 1}}},
    ]  # fmt: skip


def _beat_pids(k8s_api: client.ApiClient, namespace: str) -> dict[str, int]:
    pods = client.CoreV1Api(k8s_api).list_namespaced_pod(namespace, label_selector=f"{GROUP}/beat=demo").items
    out = {}
    for pod in pods:
        if pod.metadata.deletion_timestamp:
            continue
        ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
        match = PID_IN_MESSAGE.search((ready.message or "") if ready else "")
        if ready is not None and ready.status == "True" and match:
            out[pod.metadata.name] = int(match.group(1))
    return out


def _holder(k8s_api: client.ApiClient, namespace: str) -> str | None:
    lease = client.CoordinationV1Api(k8s_api).read_namespaced_lease("demo-beat", namespace)
    return lease.spec.holder_identity or None


def _runs_celery_beat(pid: int) -> bool:
    """True when the elector `pid` has a `celery ... beat` child (it runs beat only while leading)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        if "beat" in argv and any(a.endswith("celery") for a in argv):
            return True
    return False


def _ticks(redis_db: Any) -> list[float]:
    return sorted(float(json.loads(r)["at"]) for r in redis_db.lrange("demo:ticks", 0, -1))


def test_one_beat_runs_and_the_standby_takes_over(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime,  # noqa: F811 (the fixture)
) -> None:  # fmt: skip
    manifests = {"apiVersion": "v1", "kind": "List", "items": _manifests(redis_server.url)}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifests))

    def leader_and_standby() -> tuple[str, dict[str, int]] | None:
        pids = _beat_pids(k8s_api, namespace)
        holder = _holder(k8s_api, namespace)
        return (holder, pids) if len(pids) == 2 and holder in pids else None

    leader, pids = wait_for(leader_and_standby, timeout=120,
                            message=lambda: f"a leader and a standby; log:\n{localrun.logs()[-2000:]}")  # fmt: skip
    (standby,) = set(pids) - {leader}
    wait_for(lambda: _runs_celery_beat(pids[leader]), timeout=30, message="the leader's elector runs celery beat")
    assert not _runs_celery_beat(pids[standby]), "the standby must not run beat"

    # The elector has the pod's ServiceAccount token, not the developer's admin certificate.
    environ = dict(
        kv.split("=", 1) for kv in Path(f"/proc/{pids[leader]}/environ").read_bytes().decode().split("\0") if "=" in kv
    )
    kubeconfig = json.loads(Path(environ["KUBECONFIG"]).read_text())
    (user,) = kubeconfig["users"]
    assert set(user["user"]) == {"tokenFile"}, user

    wait_for(lambda: len(_ticks(redis_db)) >= 2, timeout=60, message="beat's ticks run on the worker")

    client.CoreV1Api(k8s_api).delete_namespaced_pod(leader, namespace)
    new_leader = wait_for(lambda: (h := _holder(k8s_api, namespace)) and h != leader and h, timeout=30,
                          message="a new lease holder")  # fmt: skip
    new_pid = wait_for(lambda: _beat_pids(k8s_api, namespace).get(new_leader), timeout=30, message="its process")
    wait_for(lambda: _runs_celery_beat(new_pid), timeout=30, message="the new leader runs celery beat")
    before = len(_ticks(redis_db))
    wait_for(lambda: len(_ticks(redis_db)) >= before + 2, timeout=60, message="ticks go on after the failover")

    # Never two schedulers: no two ticks closer than half the schedule.
    ticks = _ticks(redis_db)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert min(gaps) > TICK_SECONDS / 2, gaps
