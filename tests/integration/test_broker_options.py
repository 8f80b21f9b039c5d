"""spec.broker as users configure Celery, end to end through the operator (issue 14)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"
QUEUE = "high_priority"


def pool(name: str, broker: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": broker,
            "tiers": [{"name": "high", "queues": [QUEUE], "concurrency": 4, "replicas": {"min": 1, "max": 8},
                       "autoscaling": {"targetDepthPerReplica": 100}}],
        },
    }  # fmt: skip


def get(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def tier_depth(obj: dict[str, Any]) -> int | None:
    tiers = (obj.get("status") or {}).get("tiers", [])
    return next((t.get("queueDepth") for t in tiers if t["name"] == "high"), None)


def test_unconfigured_priority_lists_are_named_then_read_once_configured(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, redis_db: Any,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    options = {"sep": ":", "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
    app = Celery("producer", broker=redis_server.url)
    app.conf.broker_transport_options = options
    for i in range(20):
        app.send_task("tasks.work", queue=QUEUE, priority=i % 10)
    with app.connection_for_read() as conn:
        truth = conn.default_channel._size(QUEUE)
    assert truth == 20
    app.close()

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool("layout", {"url": redis_server.url})))

    def mismatch() -> dict[str, Any] | None:
        c = condition(get(k8s_api, namespace, "layout"), "BrokerKeyLayout")
        return c if c and c["status"] == "False" else None

    c = wait_for(mismatch, timeout=60, message="BrokerKeyLayout=False naming the unread lists")
    assert c["reason"] == "UnreadPriorityLists" and "high_priority:1" in c["message"], c
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    assert any(e.reason == "BrokerKeyLayoutMismatch" and e.type == "Warning" for e in events)
    assert tier_depth(get(k8s_api, namespace, "layout")) == 2  # only the bare list: 2 of 20 (priority 0)

    fixed = {"url": redis_server.url, "sep": ":", "prioritySteps": list(range(10))}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool("layout", fixed)))

    def matches() -> dict[str, Any] | None:
        obj = get(k8s_api, namespace, "layout")
        c = condition(obj, "BrokerKeyLayout")
        return obj if c and c["status"] == "True" and tier_depth(obj) == truth else None

    wait_for(
        matches,
        timeout=60,
        message=lambda: (
            f"depth {truth} (kombu's _size) and BrokerKeyLayout=True; "
            f"last: {get(k8s_api, namespace, 'layout').get('status')}"
        ),
    )


# -- TLS (issue 14.2) ---------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS, with a certificate from a CA made here, and wants client certificates."""
    d = tmp_path_factory.mktemp("mtls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    for name, san in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(san + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
         "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no", "--dir", str(d)],
        cwd=d, stdout=(d / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        files = {
            "ssl_ca_certs": str(d / "ca.crt"),
            "ssl_certfile": str(d / "client.crt"),
            "ssl_keyfile": str(d / "client.key"),
        }
        probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, socket_timeout=2, **files)
        wait_for(probe.ping, timeout=15, message="mTLS redis-server to answer PING")
        probe.close()
        yield port, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def secret(k8s_api: client.ApiClient, namespace: str, name: str, data: dict[str, str]) -> None:
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
    client.CoreV1Api(k8s_api).create_namespaced_secret(namespace, body)


def test_tls_broker_with_a_ca_from_a_configmap_and_a_client_certificate(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    mtls_redis: tuple[int, Path],
) -> None:  # fmt: skip
    port, d = mtls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="broker-ca"), data={"ca.crt": (d / "ca.crt").read_text()}),
    )
    secret(
        k8s_api,
        namespace,
        "broker-client",
        {"tls.crt": (d / "client.crt").read_text(), "tls.key": (d / "client.key").read_text()},
    )
    tls = {"ca": {"configMapName": "broker-ca", "key": "ca.crt"}, "clientCertificate": {"secretName": "broker-client"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool("tls", {"url": url, "tls": tls})))

    # What the worker pods get: the files mounted, kombu's ssl_* options in the URL.
    def template() -> dict[str, Any] | None:
        dep = client.AppsV1Api(k8s_api).list_namespaced_deployment(namespace).items
        return dep[0].spec.template if dep else None

    pod = wait_for(template, timeout=60, message="the tier Deployment")
    worker_url = next(e.value for e in pod.spec.containers[0].env if e.name == "CELERY_BROKER_URL")
    assert worker_url == (
        f"{url}?ssl_cert_reqs=required&ssl_ca_certs=/etc/celery-fleet/broker-tls/ca.crt"
        "&ssl_certfile=/etc/celery-fleet/broker-tls/tls.crt&ssl_keyfile=/etc/celery-fleet/broker-tls/tls.key"
    )
    mount = next(m for m in pod.spec.containers[0].volume_mounts if m.name == "celery-fleet-broker-tls")
    assert mount.mount_path == "/etc/celery-fleet/broker-tls" and mount.read_only
    # kombu (a real Celery producer) with exactly that URL, the files where the pod has them:
    mounted = d / "mounted"
    mounted.mkdir(exist_ok=True)
    for src, dst in (("ca.crt", "ca.crt"), ("client.crt", "tls.crt"), ("client.key", "tls.key")):
        shutil.copy(d / src, mounted / dst)
    app = Celery("producer", broker=worker_url.replace("/etc/celery-fleet/broker-tls", str(mounted)))
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    for i in range(7):
        app.send_task("tasks.work", queue=QUEUE, priority=i % 10)
    with app.connection_for_read() as conn:
        truth = conn.default_channel._size(QUEUE)
    app.close()
    assert truth == 7

    def read_over_tls() -> dict[str, Any] | None:
        obj = get(k8s_api, namespace, "tls")
        reachable = condition(obj, "BrokerReachable")
        return obj if reachable and reachable["status"] == "True" and tier_depth(obj) == truth else None

    wait_for(
        read_over_tls,
        timeout=60,
        message=lambda: f"depth {truth} over mTLS; {get(k8s_api, namespace, 'tls').get('status')}",
    )


def test_insecure_skip_verify_is_loud(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    tls_only_redis: int,
) -> None:  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_only_redis}/0"
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps(pool("insecure", {"url": url, "tls": {"insecureSkipVerify": True}})))  # fmt: skip

    def warned() -> Any:
        events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
        return next((e for e in events if e.reason == "BrokerTLSInsecure" and e.type == "Warning"), None)

    event = wait_for(warned, timeout=60, message="a BrokerTLSInsecure Warning Event")
    assert "NOT verified" in event.message

    def reachable() -> bool:
        c = condition(get(k8s_api, namespace, "insecure"), "BrokerReachable")
        return bool(c and c["status"] == "True")

    wait_for(reachable, timeout=60, message="the operator reads without verifying, as asked")


@pytest.fixture(scope="module")
def tls_only_redis(mtls_redis: tuple[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """TLS with a certificate nobody trusts, no client certificates."""
    _, d = mtls_redis
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("tls"))],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none", socket_timeout=2)
        wait_for(probe.ping, timeout=15, message="TLS redis-server to answer PING")
        probe.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
