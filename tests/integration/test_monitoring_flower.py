"""Issue 26 item 3 with a real Flower, the real operator and real workers (the local runtime runs each
pod as a `celery worker` process): a tier with `monitoring: {events: true, heartbeat: true}` shows its
workers online in Flower's metrics, its tasks in Flower's event counts, and a worker scaled in goes
offline there. A tier on the defaults (no heartbeat, no events) never appears: the control that shows
the test can fail."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kubernetes import client

from celery_fleet_localrun.cluster import RUN_LABELS
from tests.support.cluster import ROOT, Cluster
from tests.support.local_runtime import LocalRuntime
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"
METRIC = re.compile(r"^(flower_worker_online|flower_events_total)\{([^}]*)\} ([0-9.e+]+)$", re.M)


@pytest.fixture
def localrun(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(cluster, namespace, tmp_path, pythonpath=ROOT / "tests" / "support")
    yield runtime
    runtime.stop()


@pytest.fixture
def flower(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """A real Flower on the broker; it does not broadcast enable_events, so only the tier's own flags count."""
    port = free_port()
    log = (tmp_path / "flower.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-b", redis_server.url, "flower", "--address=127.0.0.1",
         f"--port={port}", "--enable_events=false"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _scrape(url) is not None, timeout=60, message=lambda: f"Flower at {url}: {_tail(tmp_path)}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "flower.log").read_text(errors="replace")[-1500:]


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _metrics(url: str) -> dict[tuple[str, str], float]:
    """(metric, labels) -> value for Flower's worker and event series."""
    return {(name, labels): float(value) for name, labels, value in METRIC.findall(_scrape(url) or "")}


def online(url: str) -> dict[str, float]:
    found = {}
    for (name, labels), value in _metrics(url).items():
        worker = re.search(r'worker="([^"]+)"', labels)
        if name == "flower_worker_online" and worker:
            found[worker.group(1)] = value
    return found


def _pool(replicas: int) -> dict[str, Any]:
    quick = {"cooldownSeconds": 0, "scaleDownStabilizationSeconds": 0}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": "mon"},
        "spec": {
            "app": "plainapp",
            "image": "local/plainapp:dev",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
            "podLabels": RUN_LABELS,
            "tiers": [
                {"name": "watched", "queues": ["watched"], "concurrency": 1, "terminationGracePeriodSeconds": 10,
                 "replicas": {"min": replicas, "max": replicas}, "autoscaling": quick,
                 "monitoring": {"events": True, "heartbeat": True}},
                {"name": "quiet", "queues": ["quiet"], "concurrency": 1, "terminationGracePeriodSeconds": 10,
                 "replicas": {"min": 1, "max": 1}},
            ],
        },
    }  # fmt: skip


def test_flower_sees_the_watched_tier_online_busy_and_offline_after_scale_in(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime, flower: str,
) -> None:  # fmt: skip
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "broker"}, "stringData": {"url": redis_server.url}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pool(2)))

    def nodes(tier: str) -> set[str]:
        pods = core.list_namespaced_pod(namespace, label_selector=f"celeryfleet.io/tier={tier}").items
        return {f"celery@{p.metadata.name}" for p in pods if p.metadata.deletion_timestamp is None}

    watched = wait_for(lambda: nodes("watched") if len(nodes("watched")) == 2 else None, timeout=60,
                       message="two pods of the watched tier")  # fmt: skip
    (quiet,) = wait_for(lambda: nodes("quiet") or None, timeout=60, message="the quiet tier's pod")
    wait_for(lambda: all(online(flower).get(n) == 1 for n in watched), timeout=120,
             message=lambda: f"{watched} online in Flower: {online(flower)}; {localrun.logs()[-1500:]}")  # fmt: skip

    # Task events come from the tier's --task-events (Flower was told not to broadcast enable_events).
    app = Celery("producer", broker=redis_server.url)
    app.send_task("plainapp.hold", args=[0], queue="watched")
    wait_for(lambda: any(n == "flower_events_total" and "task-succeeded" in labels and v >= 1
                         for (n, labels), v in _metrics(flower).items()),
             timeout=60, message=lambda: f"a task-succeeded event in Flower: {_scrape(flower)}")  # fmt: skip

    # The quiet tier answers remote control (it is up) yet never appears in Flower.
    wait_for(lambda: app.control.ping(destination=[quiet], timeout=0.5), timeout=60, message=f"{quiet} answers")
    assert quiet not in online(flower), online(flower)

    # Scale in to one: the removed worker's warm shutdown sends worker-offline.
    patch = {"spec": {"tiers": _pool(1)["spec"]["tiers"]}}
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mon", patch)
    offline = wait_for(lambda: {n for n in watched if online(flower).get(n) == 0} or None, timeout=120,
                       message=lambda: f"a watched worker offline in Flower: {online(flower)}")  # fmt: skip
    assert len(offline) == 1
    (kept,) = watched - offline
    assert online(flower)[kept] == 1
