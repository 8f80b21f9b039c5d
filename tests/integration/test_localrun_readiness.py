"""Issue 16: in the local cluster a pod the local runtime runs is not Ready before its process runs.

kwok's default stage makes every pod Ready the moment it is scheduled; the local cluster adds a stage
(hack/kwok/pod-run-by-local-runtime.yaml) that leaves readiness of the pods labelled RUN_LABEL to the
local runtime. Watched from creation, a new pool's Ready condition then goes one way only, and no
count of ready replicas ever runs ahead of the worker processes really running. Pods without the
label keep kwok's behaviour (Ready at once), which the fleet benchmark and most tests rely on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from celery_fleet_localrun.cluster import RUN_LABELS
from tests.integration.test_localrun import LocalRuntime, _pool, localrun  # noqa: F401 (the fixture)
from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
POOL, TIER, REPLICAS = "flap", "high", 3


def _running_workers(hostname_prefix: str) -> int:
    """Worker processes alive on this machine whose `--hostname` names a pod of the tier (one per pod:
    a threads pool forks no children)."""
    pods = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        if "worker" in argv and " Z " not in f"{state} ":
            pods.update(a for a in argv if a.startswith(hostname_prefix))
    return len(pods)


@dataclass
class Seen:
    """One watch event of an object, with the worker processes running when it arrived."""

    kind: str
    ready_condition: str | None
    ready_replicas: int
    workers: int


@dataclass
class Watcher:
    """Watches a list call from a resourceVersion taken before the object exists, re-watching from the
    last version seen until stopped (short server timeouts, so stopping takes at most that long)."""

    list_call: Callable[..., Any]
    args: tuple[Any, ...]
    record: Callable[[dict[str, Any]], None]
    errors: list[BaseException]
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        version = self.list_call(*self.args)["metadata"]["resourceVersion"]
        thread = threading.Thread(target=self._run, args=(version,), daemon=True)
        thread.start()
        return thread

    def _run(self, version: str) -> None:
        try:
            while not self.stopping.is_set():
                stream = watch.Watch().stream(
                    self.list_call, *self.args, resource_version=version, timeout_seconds=2,
                    allow_watch_bookmarks=False,
                )  # fmt: skip
                for event in stream:
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise AssertionError(f"watch error: {obj}")
                    version = obj["metadata"]["resourceVersion"]
                    self.record(obj)
        except BaseException as exc:  # reported by the test, never lost in a thread
            self.errors.append(exc)


def _ready_status(obj: dict[str, Any]) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status"))
    return None


@dataclass
class Watched:
    seen: list[Seen] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def events(self) -> list[Seen]:
        assert not self.errors, self.errors
        return list(self.seen)


@pytest.fixture
def watched(k8s_api: client.ApiClient, namespace: str) -> Iterator[Watched]:
    """The pool and its tier's Deployment, watched from before they exist until the test ends."""
    observed = Watched()
    seen, errors = observed.seen, observed.errors
    lock = threading.Lock()
    prefix = f"celery@{POOL}-{TIER}-"

    def pool_event(obj: dict[str, Any]) -> None:
        tiers = (obj.get("status") or {}).get("tiers") or []
        ready = sum(int(t.get("readyReplicas") or 0) for t in tiers)
        with lock:
            seen.append(Seen("pool", _ready_status(obj), ready, _running_workers(prefix)))

    def deployment_event(obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] != f"{POOL}-{TIER}":
            return
        ready = int((obj.get("status") or {}).get("readyReplicas") or 0)
        with lock:
            seen.append(Seen("deployment", None, ready, _running_workers(prefix)))

    # The generic list call yields plain dicts for both (a Deployment list is a path like any other).
    listing = client.CustomObjectsApi(k8s_api).list_namespaced_custom_object
    watchers = [
        Watcher(listing, (GROUP, VERSION, namespace, "celeryworkerpools"), pool_event, errors),
        Watcher(listing, ("apps", "v1", namespace, "deployments"), deployment_event, errors),
    ]
    threads = [w.start() for w in watchers]
    yield observed
    for w in watchers:
        w.stopping.set()
    for t in threads:
        t.join(timeout=15)
    assert not errors, errors


def test_a_new_pool_is_ready_once_and_never_ahead_of_its_workers(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, localrun: LocalRuntime, watched: Watched,  # noqa: F811 (the fixture)
) -> None:  # fmt: skip
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": redis_server.url}}
    )
    # All pods start at once: the tier is at its minimum from the first reconcile.
    pool = _pool(POOL, concurrency=1, replicas={"min": REPLICAS, "max": REPLICAS})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))

    def settled() -> bool:
        pools = [s for s in watched.events() if s.kind == "pool"]
        # Settled only once every worker runs: the runtime's reports have reached the pool by then.
        last = pools[-1] if pools else None
        return last is not None and last.ready_condition == "True" and last.ready_replicas == last.workers == REPLICAS

    wait_for(settled, timeout=180, message=lambda: f"pool Ready with {REPLICAS} ready workers; seen "
             f"{watched.seen[-5:]}; localrun log:\n{localrun.logs()[-2000:]}")  # fmt: skip

    seen = watched.events()
    pools = [s for s in seen if s.kind == "pool"]
    deployments = [s for s in seen if s.kind == "deployment"]
    assert deployments, "the tier's Deployment was watched from its creation"
    # From creation: the pool's Ready condition goes one way. kwok's default stage made it True (pods Ready
    # before any process), then False (the local runtime's first report), then True.
    readiness = [s.ready_condition for s in pools if s.ready_condition is not None]
    assert readiness[0] != "True", readiness
    first_true = readiness.index("True")
    assert all(r == "True" for r in readiness[first_true:]), f"Ready went True -> False: {readiness}"
    # Never more ready replicas than worker processes running at that moment (processes only start here).
    ahead = [s for s in seen if s.ready_replicas > s.workers]
    assert not ahead, f"ready replicas ahead of running workers: {ahead}"
    # The pods did start one after another under watch, not all before the first event.
    assert any(s.ready_replicas < REPLICAS for s in deployments), deployments


def test_kwok_leaves_readiness_of_labelled_pods_only_to_the_local_runtime(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    """Without a local runtime: labelled pods get Running and an IP from kwok but no Ready condition;
    unlabelled pods are Ready at once, as kwok's default stage makes them."""
    apps = client.AppsV1Api(k8s_api)

    def deployment(name: str, replicas: int, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name, **labels}},
                             "spec": {"containers": [{"name": "c", "image": "local/none:dev"}]}},
            },
        }  # fmt: skip

    # Many labelled pods: both stages match each of them, and kwok must pick ours every time.
    apps.create_namespaced_deployment(namespace, deployment("labelled", 12, RUN_LABELS))
    apps.create_namespaced_deployment(namespace, deployment("plain", 3, {}))
    core = client.CoreV1Api(k8s_api)

    def pods(app: str) -> list[client.V1Pod]:
        return list(core.list_namespaced_pod(namespace, label_selector=f"app={app}").items)

    wait_for(lambda: apps.read_namespaced_deployment("plain", namespace).status.ready_replicas == 3, timeout=60,
             message="kwok makes plain pods Ready at once")  # fmt: skip
    # kwok acts on a pod once, while Pending: once every labelled pod is Running it has said all it will.
    labelled = wait_for(
        lambda: (p := pods("labelled")) and len(p) == 12 and all(x.status.phase == "Running" for x in p) and p,
        timeout=60, message="12 labelled pods Running",
    )  # fmt: skip
    for pod in labelled:
        assert pod.status.pod_ip, pod.metadata.name
        types = {c.type for c in pod.status.conditions or []}
        assert "Ready" not in types and "ContainersReady" not in types, (pod.metadata.name, types)
        assert not pod.status.container_statuses, pod.metadata.name
    assert not apps.read_namespaced_deployment("labelled", namespace).status.ready_replicas
