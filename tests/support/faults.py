"""Fault-suite support: manifests, an operator of the test's own, replica and socket recorders, leak evidence.

The fault tests (issue 9) break things on purpose: they SIGKILL operators, cut the
apiserver and the broker away behind proxies, and feed bad input. Everything they
publish or log is kept in :data:`EVIDENCE`, so a final scan can prove no broker
password ever left the operator.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
POOLS, BEATS = "celeryworkerpools", "celerybeats"


# -- manifests and reads --------------------------------------------------------------------------------


def tier(name: str, queue: str, lo: int = 1, hi: int = 8, **autoscaling: Any) -> dict[str, Any]:
    knobs = {"targetDepthPerReplica": 10, "scaleDownStabilizationSeconds": 2, "scaleDownMaxStep": 10,
             "scaleDownPeriodSeconds": 1, **autoscaling}  # fmt: skip
    return {"name": name, "queues": [queue], "concurrency": 2, "replicas": {"min": lo, "max": hi},
            "autoscaling": knobs}  # fmt: skip


def pool_manifest(name: str, broker: dict[str, Any], tiers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pool whose tiers react fast (target 10 per replica, 2 s scale-down window): faults show quickly."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": broker,
            "tiers": tiers or [tier("high", "high_priority"), tier("medium", "medium_priority"),
                               tier("low", "low_priority", hi=4)],
        },
    }  # fmt: skip


def beat_manifest(name: str, broker: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryBeat",
        "metadata": {"name": name},
        "spec": {"app": "tasks:app", "image": "ghcr.io/example/celery-app:1.0", "broker": broker},
    }


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any], check: bool = True) -> str:
    """kubectl apply; returns kubectl's stderr (the admission error, when `check` is False)."""
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)
    return proc.stderr if proc.returncode else ""


def get_pool(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, POOLS, name
    )
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def tier_status(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next((t for t in (obj.get("status") or {}).get("tiers") or [] if t["name"] == name), {})


def wait_condition(
    k8s_api: client.ApiClient, namespace: str, name: str, type_: str, status: str, *, reason: str | None = None,
    timeout: float = 30,
) -> dict[str, Any]:  # fmt: skip
    """Wait until the pool's condition `type_` has `status` (and `reason`, if given); returns the condition."""

    def match() -> dict[str, Any] | None:
        cond = condition(get_pool(k8s_api, namespace, name), type_)
        ok = cond.get("status") == status and (reason is None or cond.get("reason") == reason)
        return cond if ok else None

    return wait_for(
        match, timeout=timeout,
        message=lambda: f"{namespace}/{name} {type_}={status} {reason or ''}: "
        f"{(get_pool(k8s_api, namespace, name).get('status') or {}).get('conditions')}",
    )  # fmt: skip


def wait_ready(k8s_api: client.ApiClient, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """Ready=True for the current generation, every tier's replicas ready and equal to its desired count."""

    def ready() -> dict[str, Any] | None:
        pool = get_pool(k8s_api, namespace, name)
        status = pool.get("status") or {}
        current = status.get("observedGeneration") == pool["metadata"]["generation"]
        tiers_ok = all(t.get("readyReplicas") == t.get("replicas") for t in status.get("tiers") or [])
        return pool if current and tiers_ok and condition(pool, "Ready").get("status") == "True" else None

    return wait_for(ready, timeout=timeout, message=lambda: f"{namespace}/{name} Ready: "
                    f"{get_pool(k8s_api, namespace, name).get('status')}")  # fmt: skip


def wait_converged(k8s_api: client.ApiClient, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """The operator's side of convergence: status of the current generation, not Degraded, every tier's
    Deployment at the desired replicas the status reports.

    Pod readiness is left out on purpose: on the shared cluster the controller-manager may lag
    far behind under another engineer's load, and that is not the operator's doing.
    """

    def converged() -> dict[str, Any] | None:
        pool = get_pool(k8s_api, namespace, name)
        status = pool.get("status") or {}
        if status.get("observedGeneration") != pool["metadata"]["generation"]:
            return None
        if condition(pool, "Degraded").get("status") != "False":
            return None
        deps = deployments(k8s_api, namespace, name)
        for t in pool["spec"].get("tiers") or []:
            dep = deps.get(f"{name}-{t['name']}")
            if dep is None or tier_status(pool, t["name"]).get("desiredReplicas") != dep.spec.replicas:
                return None
        return pool

    return wait_for(converged, timeout=timeout, message=lambda: f"{namespace}/{name} converged: "
                    f"{get_pool(k8s_api, namespace, name).get('status')}")  # fmt: skip


def deployments(k8s_api: client.ApiClient, namespace: str, pool: str) -> dict[str, client.V1Deployment]:
    items = (
        client.AppsV1Api(k8s_api)
        .list_namespaced_deployment(namespace, label_selector=f"celeryfleet.io/pool={pool}")
        .items
    )
    return {d.metadata.name: d for d in items}


def replicas(k8s_api: client.ApiClient, namespace: str, deployment: str) -> int:
    return int(client.AppsV1Api(k8s_api).read_namespaced_deployment(deployment, namespace).spec.replicas)


def events(k8s_api: client.ApiClient, namespace: str, name: str | None = None) -> list[client.CoreV1Event]:
    items = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    return [e for e in items if name is None or e.involved_object.name == name]


def broker_secret(k8s_api: client.ApiClient, namespace: str, name: str, data: dict[str, str | bytes]) -> None:
    encoded = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()}
    client.CoreV1Api(k8s_api).create_namespaced_secret(namespace, {"metadata": {"name": name}, "data": encoded})


def push_backlog(redis_client: Any, queue: str, n: int) -> None:
    """`n` messages waiting in `queue`'s bare list (priority step 0): depth is what counts here."""
    redis_client.rpush(queue, *[json.dumps({"body": i}) for i in range(n)])


def assert_single_owner(dep: client.V1Deployment, pool_uid: str) -> None:
    owners = dep.metadata.owner_references or []
    assert len(owners) == 1 and owners[0].uid == pool_uid and owners[0].controller, dep.metadata.owner_references


# -- an operator of the test's own, on a namespace the session operator does not watch -------------------


@contextlib.contextmanager
def own_namespace(cluster: Cluster, prefix: str = "f") -> Iterator[str]:
    """A namespace outside the session operator's glob, deleted (without waiting) afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             timeout=30, message=f"default ServiceAccount in {name}")  # fmt: skip
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def until_watched(cluster: Cluster, namespace: str, predicate: Callable[[], Any], timeout: float = 60) -> Any:
    """Wait for `predicate` (the operator's first reaction in `namespace`), nudging its namespace watch.

    Kopf 1.45 lists namespaces once, then starts its namespace watch with a second listing whose
    items it ignores: a namespace created between the two (right after the operator started)
    goes unnoticed until it next changes. A label change every couple of seconds is that change.
    """
    touches = iter(range(1_000_000))
    last = [time.monotonic()]

    def reacted() -> Any:
        value = predicate()
        if not value and time.monotonic() - last[0] > 2:
            last[0] = time.monotonic()
            cluster.kubectl("label", "namespace", namespace, f"celeryfleet.io/nudge={next(touches)}", "--overwrite")
        return value

    return wait_for(reacted, timeout=timeout, message=f"the operator's first reaction in {namespace}")


def proxied_kubeconfig(source: Path, target: Path, server: str) -> Path:
    """A copy of `source` whose clusters all point at `server` (e.g. a TcpProxy in front of the apiserver)."""
    config = yaml.safe_load(source.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = server
    target.write_text(yaml.safe_dump(config))
    target.chmod(0o600)
    return target


def apiserver_address(kubeconfig: Path) -> tuple[str, int]:
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    hostport = server.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host.strip("[]"), int(port)


# -- watching what the operator does -------------------------------------------------------------------


class ReplicaRecorder:
    """Every `spec.replicas` the apiserver reports for a namespace's Deployments, in order (a watch)."""

    def __init__(self, k8s_api: client.ApiClient, namespace: str) -> None:
        self.api = client.AppsV1Api(k8s_api)
        self.namespace = namespace
        self.seen: dict[str, list[int]] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"replicas-{namespace}")
        self._started = threading.Event()

    def __enter__(self) -> ReplicaRecorder:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._watch.stop()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        items = self.api.list_namespaced_deployment(self.namespace)
        for d in items.items:
            self.seen.setdefault(d.metadata.name, []).append(int(d.spec.replicas))
        self._started.set()
        rv = items.metadata.resource_version
        with contextlib.suppress(Exception):  # the watch ends when the test stops it
            for ev in self._watch.stream(self.api.list_namespaced_deployment, self.namespace,
                                         resource_version=rv, timeout_seconds=600):  # fmt: skip
                d = ev["object"]
                if ev["type"] in ("ADDED", "MODIFIED"):
                    self.seen.setdefault(d.metadata.name, []).append(int(d.spec.replicas))

    def mark(self, name: str) -> int:
        """A position in `name`'s history, for `lowest_since`."""
        return len(self.seen.get(name, []))

    def lowest_since(self, name: str, mark: int) -> int:
        """The lowest replica count `name` had from `mark` on, counting the value in effect at `mark`."""
        values = self.seen.get(name, [])[max(0, mark - 1) :]
        return min(values) if values else -1


@dataclass(frozen=True)
class Endpoint:
    proto: str
    host: str
    port: int
    state: str


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}  # fmt: skip


def _address(hex_addr: str) -> tuple[str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc prints IPv6 as four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        host = socket.inet_ntop(socket.AF_INET6, words)
        if host.startswith("::ffff:"):
            host = host[len("::ffff:") :]
    return host, int(port_hex, 16)


def socket_endpoints(pid: int) -> set[Endpoint]:
    """The remote ends of the connections process `pid` opened (its /proc fds matched to /proc/<pid>/net/*).

    Listening sockets and the connections they accepted (metrics scrapes, health probes) are skipped.
    """
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = Path(fd).readlink().as_posix()
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    rows: list[tuple[str, int, str, int, str]] = []  # (proto, local port, remote host, remote port, state)
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 10 or cols[9] not in inodes:
                continue
            state = _TCP_STATES.get(cols[3], cols[3]) if proto.startswith("tcp") else "UDP"
            host, port = _address(cols[2])
            rows.append((proto, _address(cols[1])[1], host, port, state))
    # Connections accepted by its own servers (metrics, health probes) are inbound: not its doing.
    listening = {local for _, local, _, _, state in rows if state == "LISTEN"}
    return {
        Endpoint(proto, host, port, state)
        for proto, local, host, port, state in rows
        if state != "LISTEN" and port != 0 and local not in listening
    }


class ConnectionSampler:
    """Samples a process's remote endpoints every `interval` seconds in a thread, for a whole scenario."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.seen: set[Endpoint] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"sockets-{pid}")

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):  # the process may be gone between two reads
                self.seen |= socket_endpoints(self.pid)
                self.samples += 1
            self._stop.wait(self.interval)


# -- leak evidence ---------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """Broker passwords used by the fault suite and everything the operators published while they were in use."""

    passwords: set[str] = field(default_factory=set)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text)

    def password(self, prefix: str = "pw") -> str:
        value = f"{prefix}-{uuid.uuid4().hex}"
        self.passwords.add(value)
        return value

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def capture_namespace(self, k8s_api: client.ApiClient, namespace: str) -> None:
        """Events, pool and beat objects (status included) and the Deployments of a namespace."""
        with contextlib.suppress(client.ApiException):
            for e in events(k8s_api, namespace):
                self.add(f"event {namespace}/{e.involved_object.name}", f"{e.reason} {e.message}")
            custom = client.CustomObjectsApi(k8s_api)
            for plural in (POOLS, BEATS):
                for obj in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]:
                    self.add(f"{plural} {namespace}/{obj['metadata']['name']}", json.dumps(obj))
            for d in client.AppsV1Api(k8s_api).list_namespaced_deployment(namespace).items:
                self.add(f"deployment {namespace}/{d.metadata.name}",
                         json.dumps(k8s_api.sanitize_for_serialization(d)))  # fmt: skip

    def capture_operator(self, operator: OperatorProcess, label: str) -> None:
        with contextlib.suppress(OSError):
            self.add(f"metrics of {label}", operator.metrics())
        self.add(f"log of {label}", operator.logs())

    def leaks(self) -> list[str]:
        return [f"{where} holds a broker password" for where, text in self.texts for p in self.passwords if p in text]

    def assert_clean(self) -> None:
        assert self.passwords, "no broker passwords were registered: the scan would prove nothing"
        assert not self.leaks(), self.leaks()


EVIDENCE = Evidence()


def started_operator(kubeconfig: Path, namespaces: list[str], log_path: Path, *extra: str) -> OperatorProcess:
    proc = OperatorProcess(kubeconfig, namespaces, log_path, *extra)
    proc.start()
    return proc


def pid_of(operator: OperatorProcess) -> int:
    assert operator.proc is not None, "operator not running"
    return int(operator.proc.pid)


def now() -> float:
    return time.monotonic()
