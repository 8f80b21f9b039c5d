"""Issue 9, security: no broker password in anything the operator publishes, and no connection
anywhere but the apiserver and the brokers its pools name.

Runs after the fault and bad-input modules (alphabetical order) and scans what they captured
too (`EVIDENCE`); run alone, it still scans its own scenario.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import (
    EVIDENCE,
    ConnectionSampler,
    apiserver_address,
    apply,
    beat_manifest,
    broker_secret,
    get_pool,
    own_namespace,
    pid_of,
    pool_manifest,
    push_backlog,
    replicas,
    started_operator,
    tier,
    wait_condition,
)
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def test_no_password_published_and_no_unexpected_connection(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], operator: OperatorProcess,
    tmp_path: Path,
) -> None:  # fmt: skip
    password = EVIDENCE.password("scan")
    wrong = EVIDENCE.password("scan-wrong")
    broker = RedisServer(tmp_path / "redis", password=password)
    broker.start()
    dead_port = free_port()  # a broker a pool names that is not there
    api_host, api_port = apiserver_address(cluster.kubeconfig)
    allowed = {(api_host, api_port), (broker.host, broker.port), ("127.0.0.1", dead_port)}
    try:
        with own_namespace(cluster, "s") as ns:
            broker_secret(k8s_api, ns, "good", {"url": broker.url})
            broker_secret(k8s_api, ns, "wrong", {"url": f"redis://:{wrong}@{broker.host}:{broker.port}/0"})
            broker_secret(k8s_api, ns, "dead", {"url": f"redis://:{password}@127.0.0.1:{dead_port}/0"})
            broker_secret(k8s_api, ns, "invalid", {"url": f"redis://:{password}@{broker.host}:99999/0"})
            op = started_operator(cluster.kubeconfig, [ns], tmp_path / "operator.log", "--log-level", "DEBUG")
            try:
                with ConnectionSampler(pid_of(op)) as sockets:
                    for name in ("good", "wrong", "dead", "invalid"):
                        ref = {"urlSecretRef": {"name": name, "key": "url"}}
                        apply(cluster, ns, pool_manifest(name, ref, [tier("work", f"work-{name}")]))
                    apply(cluster, ns, beat_manifest("clock", {"urlSecretRef": {"name": "good", "key": "url"}}))
                    push_backlog(broker.client(), "work-good", 30)
                    wait_for(lambda: replicas(k8s_api, ns, "good-work") == 3, timeout=60, message="good scaled")
                    failures: dict[str, Any] = {}
                    # An unparseable URL in the Secret is refused before any connection, naming the Secret.
                    for name, type_, status, reason in (
                        ("wrong", "BrokerReachable", "False", "BrokerAuthFailed"),
                        ("dead", "BrokerReachable", "False", "BrokerUnreachable"),
                        ("invalid", "Degraded", "True", "BrokerSecretInvalid"),
                    ):
                        failures[name] = wait_condition(k8s_api, ns, name, type_, status, reason=reason)
                    # A rotation: the Secret now names the right password; the next reconcile picks it up.
                    client.CoreV1Api(k8s_api).patch_namespaced_secret("wrong", ns, {"stringData": {"url": broker.url}})
                    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
                        "celeryfleet.io", "v1alpha1", ns, "celeryworkerpools", "wrong",
                        {"metadata": {"annotations": {"rotated": "yes"}}},
                    )  # fmt: skip
                    wait_condition(k8s_api, ns, "wrong", "BrokerReachable", "True")
                    assert sockets.samples > 10
                EVIDENCE.capture_namespace(k8s_api, ns)
                EVIDENCE.capture_operator(op, f"operator of {ns} (DEBUG)")
            finally:
                op.stop()
            EVIDENCE.add(f"final log of {ns}", op.logs())
            assert get_pool(k8s_api, ns, "good")["status"]
    finally:
        broker.stop()

    # Every remote end the operator had: the apiserver or a broker one of its pools names.
    unexpected = {e for e in sockets.seen if (e.host, e.port) not in allowed}
    assert not unexpected, f"connections beyond the apiserver and the pools' brokers: {unexpected}"
    assert (api_host, api_port) in {(e.host, e.port) for e in sockets.seen}
    assert (broker.host, broker.port) in {(e.host, e.port) for e in sockets.seen}

    # No password in anything published: this scenario, every fault and bad-input test before it,
    # and the session operator that served them.
    EVIDENCE.capture_operator(operator, "session operator")
    for f in failures.values():
        assert password not in f["message"] and wrong not in f["message"]
    print(f"scanned {len(EVIDENCE.texts)} captures for {len(EVIDENCE.passwords)} passwords")
    EVIDENCE.assert_clean()
