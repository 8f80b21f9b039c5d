"""The elector as a beat pod runs it: standalone file, no site-packages, a ServiceAccount token
(re-read from its file), and a Role granting get/update on one pre-created Lease and nothing else."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_fleet.leader import endpoint_from_kubeconfig
from tests.support.beatapp import BeatElector, parse_elector_log, standalone_elector
from tests.support.cluster import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LEASE = "beat"
SERVICE_ACCOUNT = "beat"


def _apply(cluster: Cluster, namespace: str, objects: list[dict[str, object]]) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def lease_role(namespace: str, lease: str = LEASE) -> list[dict[str, object]]:
    """What the CeleryBeat reconciler should create: exactly the elector's needs on one Lease."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "beat-lease"},
            "rules": [
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": [lease],
                    "verbs": ["get", "update"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "beat-lease"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "beat-lease"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
        {
            # Created by the reconciler with an empty spec; the elector only ever fills the spec in.
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": lease, "labels": {"app.kubernetes.io/managed-by": "celery-fleet"}},
            "spec": {},
        },
    ]


class PodLikeElector:
    def __init__(self, cluster: Cluster, namespace: str, workdir: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir
        endpoint = endpoint_from_kubeconfig(str(cluster.kubeconfig), None)[0]
        assert endpoint.ca_file is not None
        self.server = endpoint.server
        self.ca_file = Path(endpoint.ca_file)
        self.token_file = workdir / "token"
        self.procs: list[BeatElector] = []

    def fresh_token(self) -> str:
        return self.cluster.kubectl("create", "token", SERVICE_ACCOUNT, "-n", self.namespace).stdout.strip()

    def start(self, identity: str, lease: str = LEASE) -> BeatElector:
        elector = standalone_elector(self.workdir)
        log_path = self.workdir / f"{identity}.log"
        argv = [
            sys.executable, "-I", "-S", str(elector),  # -I -S: no site-packages, no PYTHONPATH, no cwd
            "--server", self.server, "--ca-file", str(self.ca_file), "--token-file", str(self.token_file),
            "--lease", lease, "--identity", identity,
            "--duration", "4", "--renew-deadline", "3", "--retry-period", "0.5",
            "--", "sleep", "600",
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "POD_NAMESPACE": self.namespace}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
        running = BeatElector(identity, proc, log_path)
        self.procs.append(running)
        return running

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def pod(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[PodLikeElector]:
    _apply(cluster, namespace, lease_role(namespace))
    elector = PodLikeElector(cluster, namespace, tmp_path)
    elector.token_file.write_text(elector.fresh_token())
    yield elector
    elector.close()


def _lease(cluster: Cluster, namespace: str) -> dict[str, object]:
    return dict(json.loads(cluster.kubectl("get", "lease", LEASE, "-n", namespace, "-o", "json").stdout))


def test_service_account_with_get_update_on_one_lease_is_enough(pod: PodLikeElector, cluster: Cluster) -> None:
    elector = pod.start("beat-pod-0")
    wait_for(lambda: elector.times("cmd-started"), timeout=15, message=lambda: elector.log_path.read_text())
    lease = _lease(cluster, pod.namespace)
    assert lease["spec"]["holderIdentity"] == "beat-pod-0"  # type: ignore[index]
    # The elector's full-object PUT keeps what the reconciler put on the Lease.
    assert lease["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "celery-fleet"}  # type: ignore[index]

    elector.proc.send_signal(signal.SIGTERM)
    assert elector.proc.wait(timeout=10) == 0
    assert [e.event for e in elector.events()][-3:] == ["cmd-stopping", "cmd-stopped", "released"]


def test_the_role_allows_the_lease_and_nothing_else(pod: PodLikeElector, cluster: Cluster) -> None:
    who = f"system:serviceaccount:{pod.namespace}:{SERVICE_ACCOUNT}"

    def can(*args: str) -> bool:
        proc = cluster.kubectl("auth", "can-i", *args, "-n", pod.namespace, "--as", who, check=False)
        return proc.stdout.strip() == "yes"

    assert can("get", f"leases/{LEASE}") and can("update", f"leases/{LEASE}")
    assert not can("get", "leases/other")
    assert not can("create", "leases")
    assert not can("delete", f"leases/{LEASE}")
    assert not can("get", "secrets")
    assert not can("list", "pods")


def test_a_lease_outside_the_role_is_refused_with_a_hint(pod: PodLikeElector) -> None:
    elector = pod.start("beat-pod-0", lease="other")
    wait_for(lambda: elector.times("api-error"), timeout=15, message=lambda: elector.log_path.read_text())
    error = next(e for e in elector.events() if e.event == "api-error")
    assert error.fields["status"] == "403"
    assert "RBAC allows get/update/create on this lease" in error.fields["error"]
    assert elector.times("cmd-started") == []


def test_the_token_file_is_re_read_so_rotation_works(pod: PodLikeElector) -> None:
    elector = pod.start("beat-pod-0")
    wait_for(lambda: elector.times("cmd-started"), timeout=15, message=lambda: elector.log_path.read_text())

    pod.token_file.write_text("not-a-token")
    wait_for(lambda: elector.times("cmd-stopped"), timeout=10, message=lambda: elector.log_path.read_text())
    failure = next(e for e in elector.events() if e.event == "renew-failed")
    assert failure.fields["status"] == "401"
    assert next(e for e in elector.events() if e.event == "lost").fields["reason"] == "renew-deadline"

    pod.token_file.write_text(pod.fresh_token())
    wait_for(lambda: len(elector.times("cmd-started")) == 2, timeout=15, message=lambda: elector.log_path.read_text())
    events = parse_elector_log(elector.log_path.read_text())
    assert "api-recovered" in [e.event for e in events]
