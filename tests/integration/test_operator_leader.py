"""Issue 9: two operator replicas under `run --leader-elect`: one acts, the other takes over when it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.redis_server import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def _pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "celeryfleet.io/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {"app": "a", "image": "example/app:1", "broker": {"url": "redis://127.0.0.1:1/0"},
                 "tiers": [{"name": "only", "queues": ["q"], "concurrency": 1, "replicas": {"min": 1, "max": 2}}]},
    }  # fmt: skip


class Replica:
    def __init__(self, cluster: Cluster, namespace: str, identity: str, log: Path) -> None:
        self.identity, self.log = identity, log
        args = [
            sys.executable, "-m", "celery_fleet.cli", "run", "--kubeconfig", str(cluster.kubeconfig),
            "--namespace", namespace, "--metrics-port", "0",
            "--health-endpoint", f"http://127.0.0.1:{free_port()}/healthz",
            "--leader-elect", "--lease-namespace", namespace, "--lease-name", "operator",
            "--identity", identity, "--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def runs_operator(self) -> bool:
        return "event=cmd-started" in self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def own_namespace(cluster: Cluster) -> Iterator[str]:
    # Not the session prefix: the session's operator must not act here.
    ns = f"le-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_one_replica_acts_and_the_other_takes_over(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], own_namespace: str, tmp_path: Path
) -> None:
    ns = own_namespace
    apps, coord = client.AppsV1Api(k8s_api), client.CoordinationV1Api(k8s_api)
    replicas = [Replica(cluster, ns, name, tmp_path / f"{name}.log") for name in ("replica-a", "replica-b")]
    try:
        holder = wait_for(lambda: coord.read_namespaced_lease("operator", ns).spec.holder_identity, timeout=30,
                          message="a replica holds the operator Lease")  # fmt: skip
        leader = next(r for r in replicas if r.identity == holder)
        standby = next(r for r in replicas if r is not leader)
        wait_for(leader.runs_operator, timeout=30, message="the leader runs the operator")
        assert not standby.runs_operator(), "the standby must not run the operator while the leader holds the Lease"

        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_pool("first")))
        wait_for(lambda: apps.read_namespaced_deployment("first-only", ns), timeout=60, message="leader reconciles")
        dep = apps.read_namespaced_deployment("first-only", ns)
        assert {m.manager for m in dep.metadata.managed_fields} >= {"celery-fleet"}
        assert not standby.runs_operator()

        # The leader dies hard (elector and operator): the standby takes over after the Lease expires.
        leader.proc.kill()
        leader.proc.wait()
        wait_for(standby.runs_operator, timeout=30, message="the standby starts the operator")
        assert coord.read_namespaced_lease("operator", ns).spec.holder_identity == standby.identity
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_pool("second")))
        wait_for(lambda: apps.read_namespaced_deployment("second-only", ns), timeout=60,
                 message="the new leader reconciles")  # fmt: skip
        # The old operator process died with its elector (it runs with a parent-death signal).
        assert "cmd-started" in leader.text()
    finally:
        for r in replicas:
            r.stop()
