"""Issue 16: pools and beats judged by kstatus itself (cli-utils' status.Compute, what Flux and Helm 4 use)
and by the chart's Argo CD health script in a real Lua runtime.

Every version of the object the apiserver hands out (a watch from before its creation) goes through the
`kstatus` command built from sigs.k8s.io/cli-utils by hack/build-binaries.sh, so what is asserted is what a
GitOps pipeline would conclude, not our reading of our own conditions.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client, watch

from tests.support.argocd import argocd_health
from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.tools import tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
GROUP, VERSION = "celeryfleet.io", "v1alpha1"


def kstatus(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """kstatus' verdict ({status, message}) on each object."""
    if not objects:
        return []
    proc = subprocess.run(
        [str(tool("kstatus"))], input=json.dumps({"items": objects}), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@dataclass
class History:
    """Every version of one object, as a watch delivers them."""

    versions: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.versions)

    def verdicts(self) -> list[tuple[int, int | None, str, str]]:
        """(generation, status.observedGeneration, kstatus status, message) per version."""
        objs = self.snapshot()
        return [
            (o["metadata"]["generation"], (o.get("status") or {}).get("observedGeneration"), v["status"], v["message"])
            for o, v in zip(objs, kstatus(objs), strict=True)
        ]

    def latest(self) -> tuple[dict[str, Any], tuple[int, int | None, str, str]] | None:
        """The newest version and its verdict, from one snapshot (a version may arrive between two reads)."""
        objs = self.snapshot()
        if not objs:
            return None
        obj, (verdict,) = objs[-1], kstatus(objs[-1:])
        observed = (obj.get("status") or {}).get("observedGeneration")
        return obj, (obj["metadata"]["generation"], observed, verdict["status"], verdict["message"])

    def wait_status(self, status: str, *, generation: int, timeout: float = 60) -> tuple[int, int | None, str, str]:
        """The latest verdict `status` on a version whose status observed `generation`."""

        def reached() -> tuple[int, int | None, str, str] | None:
            return next((v for v in reversed(self.verdicts()) if v[:3] == (generation, generation, status)), None)

        return wait_for(reached, timeout=timeout, message=lambda: f"kstatus {status} at generation {generation}: "
                        f"{self.verdicts()[-3:]}")  # fmt: skip


@pytest.fixture
def history(k8s_api: client.ApiClient, namespace: str) -> Iterator[Any]:
    """history(plural, name) -> History, recording from now until the test ends."""
    stops: list[watch.Watch] = []

    def start(plural: str, name: str) -> History:
        h = History()
        w = watch.Watch()
        stops.append(w)
        api = client.CustomObjectsApi(k8s_api)

        def run() -> None:
            for event in w.stream(
                api.list_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                field_selector=f"metadata.name={name}", timeout_seconds=300,
            ):  # fmt: skip
                if event["type"] in ("ADDED", "MODIFIED"):
                    with h.lock:
                        h.versions.append(event["object"])

        threading.Thread(target=run, daemon=True).start()
        return h

    yield start
    for w in stops:
        w.stop()


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pool(name: str, broker: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "shop.celery:app",
            "image": "example/shop:1",
            "broker": broker,
            "tiers": [
                {"name": "high", "queues": ["high_priority"], "concurrency": 2, "replicas": {"min": 1, "max": 2}}
            ],
            **spec,
        },
    }


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def test_pool_new_ready_broken_fixed_changed(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, history: Any
) -> None:
    name = "health"
    h = history("celeryworkerpools", name)
    _apply(cluster, namespace, _pool(name, {"url": "redis://127.0.0.1:1/0"}))

    # new -> InProgress -> Current, and never Current in between (no Ready flap on the way). The version
    # the apiserver creates has no status yet, which kstatus reads as Current: the first status must
    # follow at once and say Reconciling.
    h.wait_status("Current", generation=1)
    verdicts = h.verdicts()
    with_status = [v for v in verdicts if v[1] is not None]
    first_current = next(i for i, v in enumerate(with_status) if v[2] == "Current")
    assert with_status[0][2] == "InProgress", verdicts
    assert first_current > 0 and all(v[2] == "InProgress" for v in with_status[:first_current]), verdicts
    assert all(v[2] == "Current" for v in with_status[first_current:]), verdicts
    argo = [argocd_health(o)[0] for o in h.snapshot()]
    assert argo[0] == "Progressing" and argo[-1] == "Healthy", argo  # Argo CD: no status yet is not Healthy

    # broken: a Secret only the user can create -> Failed, with our message, once generation 2 is observed.
    _apply(cluster, namespace, _pool(name, {"urlSecretRef": {"name": "broker", "key": "url"}}))
    failed = h.wait_status("Failed", generation=2, timeout=30)
    pool = h.snapshot()[-1]
    stalled = _condition(pool, "Stalled")
    assert stalled["reason"] == "BrokerSecretMissing" and failed[3] == stalled["message"]
    assert "spec.broker.urlSecretRef" in failed[3] and "Create it" in failed[3]
    assert argocd_health(pool) == ("Degraded", stalled["message"])
    # Until the operator observed generation 2, kstatus said InProgress, never Current or Failed.
    assert all(v[2] == "InProgress" for v in h.verdicts() if v[0] == 2 and v[1] != 2)

    # fixed -> Current.
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": "redis://127.0.0.1:1/0"}}
    )
    h.wait_status("Current", generation=2, timeout=60)

    # a spec change: InProgress until observed (the controller-manager rolls the tier out), then Current.
    _apply(cluster, namespace, _pool(name, {"urlSecretRef": {"name": "broker", "key": "url"}}, image="example/shop:2"))
    h.wait_status("Current", generation=3, timeout=60)
    gen3 = [v for v in h.verdicts() if v[0] == 3]
    assert gen3[0][2] == "InProgress", gen3  # the apiserver's first version of generation 3 is not observed yet
    assert all(v[2] == "InProgress" for v in gen3 if v[1] != 3), gen3
    assert argocd_health(h.snapshot()[-1])[0] == "Healthy"
    assert all(argocd_health(o)[0] == "Progressing" for o in h.snapshot() if o["metadata"]["generation"] == 3
               and (o.get("status") or {}).get("observedGeneration") != 3)  # fmt: skip

    # paused: Argo CD shows Suspended; kstatus Current (nothing is in progress).
    paused = _pool(name, {"urlSecretRef": {"name": "broker", "key": "url"}}, image="example/shop:2", paused=True)
    _apply(cluster, namespace, paused)
    h.wait_status("Current", generation=4, timeout=30)
    assert argocd_health(h.snapshot()[-1])[0] == "Suspended"


def test_pool_child_rejected_is_failed(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, history: Any
) -> None:
    h = history("celeryworkerpools", "rejected")
    _apply(cluster, namespace, _pool("rejected", {"url": "redis://127.0.0.1:1/0"}, podLabels={"team": "not ok!"}))
    failed = h.wait_status("Failed", generation=1, timeout=30)
    assert "rejected a child" in failed[3] and "not ok!" in failed[3]
    assert _condition(h.snapshot()[-1], "Stalled")["reason"] == "ChildRejected"
    assert argocd_health(h.snapshot()[-1]) == ("Degraded", failed[3])


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_beat_electing_led_leaderless(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, history: Any
) -> None:
    name = "health"
    h = history("celerybeats", name)
    beat = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryBeat",
        "metadata": {"name": name},
        "spec": {
            "app": "shop.celery:app",
            "image": "example/shop:1",
            "broker": {"url": "redis://127.0.0.1:1/0"},
            "standby": 0,
            "lease": {"durationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 1},
        },
    }
    _apply(cluster, namespace, beat)
    electing = h.wait_status("InProgress", generation=1, timeout=30)
    assert electing[1] == 1  # observed, and still not Current: nobody holds the lease
    assert argocd_health(h.snapshot()[-1])[0] == "Progressing"

    coord = client.CoordinationV1Api(k8s_api)
    lease = wait_for(lambda: coord.read_namespaced_lease(f"{name}-beat", namespace), timeout=30, message="Lease")
    lease.spec.holder_identity, lease.spec.lease_duration_seconds = f"{name}-beat-pod-a", 3
    lease.spec.renew_time = lease.spec.acquire_time = dt.datetime.now(dt.UTC)
    coord.replace_namespaced_lease(f"{name}-beat", namespace, lease)
    h.wait_status("Current", generation=1, timeout=20)
    assert argocd_health(h.snapshot()[-1]) == ("Healthy", f"{name}-beat-pod-a holds the lease and runs celery beat")

    # Nobody renews: leaderless is not Current (InProgress with our message; a standby may still lead).
    def leaderless() -> tuple[dict[str, Any], tuple[int, int | None, str, str]] | None:
        got = h.latest()
        return got if got and _condition(got[0], "Degraded").get("reason") == "NoLeader" else None

    obj, last = wait_for(leaderless, timeout=30, message="beat leaderless")
    assert last[2] == "InProgress" and "no pod has held the lease" in last[3], last
    assert argocd_health(obj) == ("Degraded", last[3])
