"""Two operator replicas under `run --leader-elect` (issues 9, 13.10): one acts, the other stands by
healthy (its probes must not restart it) and takes over, and reconciles, when the leader is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from celery_fleet.leader import endpoint_from_kubeconfig
from tests.integration.test_prometheus_live import Prometheus
from tests.support.cluster import Cluster
from tests.support.http_fault_proxy import HttpFaultProxy
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
    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        identity: str,
        log: Path,
        kubeconfig: Path | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.identity, self.log = identity, log
        self.health_url = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        args = [
            sys.executable, "-m", "celery_fleet.cli", "run", "--kubeconfig", str(kubeconfig or cluster.kubeconfig),
            "--namespace", namespace, "--metrics-port", str(metrics_port), "--metrics-addr", "127.0.0.1",
            "--health-endpoint", self.health_url,
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

    def health(self) -> tuple[int, str] | None:
        """What the liveness and readiness probes get (None while nothing listens yet)."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as reply:
                return int(reply.status), reply.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except urllib.error.URLError:
            return None

    def metrics(self) -> dict[str, Any] | None:
        """The metric families this replica's /metrics serves (None while nothing listens yet)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
                return {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        except urllib.error.URLError:
            return None

    def operator_pid(self) -> int:
        """The operator process the elector started (its command)."""
        started = [line for line in self.text().splitlines() if "event=cmd-started" in line][-1]
        return int(started.split("pid=")[1].split()[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture
def own_namespace(cluster: Cluster) -> Iterator[str]:
    # Not the session prefix: the session's operator must not act here.
    ns = f"le-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("victim", ["operator-process", "whole-replica"])
def test_one_replica_acts_and_the_other_takes_over(
    cluster: Cluster,
    k8s_api: client.ApiClient,
    crds_installed: list[str],
    own_namespace: str,
    tmp_path: Path,
    victim: str,
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
        # The probes: the standby is healthy while it waits (it used to crash-loop on liveness), and
        # the leader answers for its operator once Kopf serves its own endpoint.
        wait_for(lambda: (standby.health() or (0, ""))[1].startswith("standby"), timeout=30,
                 message=lambda: f"the standby's health: {standby.health()}")  # fmt: skip
        assert (standby.health() or (0, ""))[0] == 200
        # (Kopf's endpoint answers a JSON object of its probes' results; our start-up grace says "starting".)
        wait_for(lambda: (leader.health() or (0, ""))[1].startswith("leading: {"), timeout=30,
                 message=lambda: f"the leader's health: {leader.health()}")  # fmt: skip

        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_pool("first")))
        wait_for(lambda: apps.read_namespaced_deployment("first-only", ns), timeout=60, message="leader reconciles")
        dep = apps.read_namespaced_deployment("first-only", ns)
        assert {m.manager for m in dep.metadata.managed_fields} >= {"celery-fleet"}
        assert not standby.runs_operator()

        operator_pid = leader.operator_pid()
        if victim == "operator-process":
            # Its elector exits (a dead command ends the pod's main process, so the kubelet restarts
            # it) and releases the Lease: the standby takes over within a retry period.
            os.kill(operator_pid, signal.SIGKILL)
            assert leader.proc.wait(timeout=20) != 0
            assert "event=released" in leader.text()
        else:
            # Elector and all (a node lost): the operator dies with it (parent-death signal) and the
            # standby takes over once the Lease expires.
            leader.proc.kill()
            leader.proc.wait()
            wait_for(lambda: not _alive(operator_pid), timeout=5, message="the operator to die with its elector")
        wait_for(standby.runs_operator, timeout=30, message="the standby starts the operator")
        assert coord.read_namespaced_lease("operator", ns).spec.holder_identity == standby.identity
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_pool("second")))
        wait_for(lambda: apps.read_namespaced_deployment("second-only", ns), timeout=60,
                 message="the new leader reconciles")  # fmt: skip
        assert (standby.health() or (0, ""))[0] == 200
    finally:
        for r in replicas:
            r.stop()


def test_the_operator_starts_after_a_lost_acquire_reply_and_a_failed_renewal(
    cluster: Cluster, own_namespace: str, tmp_path: Path
) -> None:
    """Issue 13.4 for `run --leader-elect`: the acquire lands but its reply is lost, the next GET
    adopts it, the renewal right after fails with a 500. Before the fix the replica held the Lease
    and never started the operator: no operator anywhere, the other replicas locked out."""
    endpoint, _ = endpoint_from_kubeconfig(str(cluster.kubeconfig), None)
    assert endpoint.ca_file is not None
    proxy = HttpFaultProxy(endpoint.server, endpoint.ca_file, endpoint.client_cert_file, endpoint.client_key_file)
    proxy.script = {2: "lose-reply", 4: "http-500"}
    proxy.start()
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "operator"}, "spec": {}}
    cluster.kubectl("apply", "-n", own_namespace, "-f", "-", input=json.dumps(lease))
    # The replica (elector and operator alike) reaches the apiserver only through the proxy.
    kubeconfig = tmp_path / "proxied-kubeconfig.json"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "proxied",
        "clusters": [{"name": "proxied", "cluster": {"server": proxy.url}}],
        "users": [{"name": "proxied", "user": {}}],
        "contexts": [{"name": "proxied", "context": {"cluster": "proxied", "user": "proxied"}}],
    }))  # fmt: skip
    replica = Replica(cluster, own_namespace, "replica-a", tmp_path / "replica-a.log", kubeconfig=kubeconfig)
    try:
        wait_for(lambda: len(proxy.requests) >= 5, timeout=30, message=replica.text)
        assert proxy.methods()[:5] == [
            ("GET", "pass"), ("PUT", "lose-reply"), ("GET", "pass"), ("PUT", "http-500"), ("PUT", "pass"),
        ], proxy.methods()  # fmt: skip
        wait_for(replica.runs_operator, timeout=15, message=replica.text)
        assert _alive(replica.operator_pid())
        assert "event=lost" not in replica.text()
    finally:
        replica.stop()
        proxy.stop()


def test_every_replica_serves_metrics_and_a_live_prometheus_sees_one_leader(
    cluster: Cluster, crds_installed: list[str], own_namespace: str, tmp_path: Path
) -> None:
    replicas = [
        Replica(cluster, own_namespace, name, tmp_path / f"{name}.log", metrics_port=free_port())
        for name in ("replica-a", "replica-b")
    ]
    try:
        wait_for(lambda: any(r.runs_operator() for r in replicas), timeout=30, message="a replica runs the operator")

        def scraped() -> list[tuple[float, bool]] | None:
            # What Prometheus would get from each target: the leader gauge, and the operator's own metrics.
            found = [r.metrics() for r in replicas]
            if any(f is None for f in found):
                return None
            out = [(f["leader_election_master_status"].samples[0].value, "celery_fleet_pools" in f) for f in found if f]
            return out if sorted(out) == [(0.0, False), (1.0, True)] else None

        result = wait_for(
            scraped, timeout=60, message=lambda: f"both replicas' metrics: {[r.metrics() for r in replicas]}"
        )
        leader = replicas[[v for v, _ in result].index(1.0)]
        assert leader.runs_operator()

        # A live Prometheus scraping both: no target down, the gauge 1 on exactly one of them.
        targets = [r.metrics_url.removeprefix("http://").removesuffix("/metrics") for r in replicas]
        (tmp_path / "prometheus").mkdir()
        prometheus = Prometheus(tmp_path / "prometheus", targets, [])
        try:

            def seen() -> dict[str, dict[str, float]] | None:
                by_query = {
                    q: {
                        s["metric"]["instance"]: float(s["value"][1])
                        for s in prometheus.api("query", query=q)["result"]
                    }
                    for q in ("up", "leader_election_master_status")
                }
                return by_query if all(len(v) == 2 for v in by_query.values()) else None

            found = wait_for(seen, timeout=60, message=lambda: f"both targets scraped; log:\n{prometheus.logs()}")
            assert sorted(found["up"].values()) == [1.0, 1.0]
            leading = [i for i, v in found["leader_election_master_status"].items() if v == 1.0]
            assert leading == [targets[replicas.index(leader)]]
        finally:
            prometheus.stop()
    finally:
        for r in replicas:
            r.stop()
