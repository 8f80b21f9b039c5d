"""Issue 9, faults: the operator, the apiserver and other writers fail mid-flight; the cluster still converges.

Tests that kill or cut off the operator run their own operator process on their own
namespace (`f-...`), which the session operator does not watch.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import (
    EVIDENCE,
    GROUP,
    POOLS,
    VERSION,
    ReplicaRecorder,
    apiserver_address,
    apply,
    assert_single_owner,
    broker_secret,
    deployments,
    get_pool,
    own_namespace,
    pool_manifest,
    proxied_kubeconfig,
    push_backlog,
    replicas,
    started_operator,
    tier_status,
    wait_ready,
)
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

TIERS = ("high", "medium", "low")


@pytest.fixture
def secured_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A password-protected Redis; its password is registered for the leak scan."""
    server = RedisServer(tmp_path / "redis", password=EVIDENCE.password("faults"))
    server.start()
    yield server
    server.stop()


def _expect_children(k8s_api: client.ApiClient, namespace: str, pool: str) -> dict[str, client.V1Deployment]:
    """Exactly one complete Deployment per tier, each owned by the pool alone."""
    deps = deployments(k8s_api, namespace, pool)
    assert set(deps) == {f"{pool}-{t}" for t in TIERS}, sorted(deps)
    uid = get_pool(k8s_api, namespace, pool)["metadata"]["uid"]
    for name, dep in deps.items():
        assert_single_owner(dep, uid)
        args = dep.spec.template.spec.containers[0].args
        assert args[args.index("-Q") + 1] == f"{name.rsplit('-', 1)[1]}_priority", args
        assert dep.spec.template.metadata.annotations.get("celeryfleet.io/config-hash"), dep.metadata.name
    all_in_ns = client.AppsV1Api(k8s_api).list_namespaced_deployment(namespace, label_selector="!decoy").items
    assert sorted(d.metadata.name for d in all_in_ns) == sorted(deps), "orphaned or stray Deployments"
    return deps


def _wait_log(op: OperatorProcess, offset: int, text: str, timeout: float = 30) -> None:
    """Wait until `text` appears in the operator's log after byte `offset`."""
    wait_for(lambda: text in op.logs()[offset:], timeout=timeout,
             message=lambda: f"{text!r} in the log:\n{op.logs()[offset:][-3000:]}")  # fmt: skip


def _slow_down_deployment_listing(k8s_api: client.ApiClient, namespace: str, count: int = 10) -> None:
    """Managed-labelled Deployments of ~200 KB each (no pool label, no pods): a 2 MB list to read."""
    apps = client.AppsV1Api(k8s_api)
    for i in range(count):
        labels = {"app.kubernetes.io/managed-by": "celery-fleet", "decoy": "yes"}
        apps.create_namespaced_deployment(namespace, {
            "metadata": {"name": f"decoy-{i}", "labels": labels, "annotations": {"ballast": "x" * 200_000}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"decoy": "yes"}},
                     "template": {"metadata": {"labels": {"decoy": "yes"}},
                                  "spec": {"containers": [{"name": "c", "image": "none"}]}}},
        })  # fmt: skip


def test_sigkill_mid_reconcile_and_mid_scale_keeps_replicas(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], secured_redis: RedisServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    with own_namespace(cluster) as ns:
        broker_secret(k8s_api, ns, "broker", {"url": secured_redis.url})
        log = tmp_path / "operator.log"
        op = started_operator(cluster.kubeconfig, [ns], log)
        try:
            # 1. Killed while creating the tiers: as soon as the first child exists.
            apply(cluster, ns, pool_manifest("orders", {"urlSecretRef": {"name": "broker", "key": "url"}}))
            wait_for(lambda: deployments(k8s_api, ns, "orders"), timeout=30, interval=0.02, message="first child")
            op.kill()
            op.start()
            wait_ready(k8s_api, ns, "orders")
            _expect_children(k8s_api, ns, "orders")

            # 2. Killed right after a scale-up, before the status could follow.
            redis = secured_redis.client()
            push_backlog(redis, "high_priority", 50)
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 5, timeout=30, interval=0.05,
                     message="high scaled to 5")  # fmt: skip
            op.kill()
            # A big fleet's Deployment list takes longer than its pool list: a restarted operator
            # must not reconcile pools before their Deployments are in its cache (it would take
            # them for missing and apply them at replicas.min).
            _slow_down_deployment_listing(k8s_api, ns)
            with ReplicaRecorder(k8s_api, ns) as recorder:
                mark = len(recorder.seen["orders-high"])
                push_backlog(redis, "high_priority", 20)  # 70 queued: 7 replicas, for the restarted operator
                op.start()
                wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 7, timeout=30, message="high scaled to 7")

                # 3. Killed mid-scale: the scale landed, its Event and status had not.
                push_backlog(redis, "medium_priority", 40)
                wait_for(lambda: replicas(k8s_api, ns, "orders-medium") == 4, timeout=30, interval=0.02,
                         message="medium scaled to 4")  # fmt: skip
                op.kill()
                op.start()

                def converged() -> dict[str, Any] | None:
                    pool = wait_ready(k8s_api, ns, "orders")
                    ok = (tier_status(pool, "high").get("desiredReplicas") == 7
                          and tier_status(pool, "medium").get("desiredReplicas") == 4)  # fmt: skip
                    return pool if ok else None

                pool = wait_for(converged, timeout=60, message="status converged on 7 high, 4 medium")
            # Never reset to the minimum (1) by a restarted operator: the lowest value seen after the
            # first kill is the 5 the tier had then.
            assert recorder.lowest_since("orders-high", mark) >= 5, recorder.seen["orders-high"]
            assert min(recorder.seen["orders-medium"][-3:]) >= 1
            assert tier_status(pool, "high")["replicas"] == 7 and tier_status(pool, "medium")["replicas"] == 4
            _expect_children(k8s_api, ns, "orders")
            assert "Traceback" not in op.logs()
        finally:
            EVIDENCE.capture_namespace(k8s_api, ns)
            EVIDENCE.capture_operator(op, f"operator of {ns}") if op.proc else EVIDENCE.add("log", op.logs())
            op.stop(signal.SIGTERM)
    EVIDENCE.assert_clean()


def test_apiserver_outage_during_scaling_reconnects_and_converges(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], secured_redis: RedisServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The apiserver goes away (every connection reset, new ones refused) and comes back, as in a restart.

    The shared cluster cannot be restarted, so a proxy between this test's operator and the
    apiserver is cut instead: from the operator's side it is the same.
    """
    host, port = apiserver_address(cluster.kubeconfig)
    with own_namespace(cluster) as ns, TcpProxy(host, port) as proxy:
        kubeconfig = proxied_kubeconfig(cluster.kubeconfig, tmp_path / "kubeconfig", proxy.url)
        broker_secret(k8s_api, ns, "broker", {"url": secured_redis.url})
        op = started_operator(kubeconfig, [ns], tmp_path / "operator.log")
        try:
            apply(cluster, ns, pool_manifest("orders", {"urlSecretRef": {"name": "broker", "key": "url"}}))
            wait_ready(k8s_api, ns, "orders")
            redis = secured_redis.client()
            push_backlog(redis, "high_priority", 30)
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 3, timeout=30, message="high scaled to 3")

            for mode in ("reset", "blackhole"):
                proxy.cut(mode)
                before = len(op.logs())
                # While the operator cannot reach the apiserver: more work arrives and the spec changes.
                push_backlog(redis, "high_priority", 20)
                wanted = replicas(k8s_api, ns, "orders-high") + 2
                pool = get_pool(k8s_api, ns, "orders")
                tiers = pool["spec"]["tiers"]
                tiers[2]["concurrency"] += 1
                client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
                    GROUP, VERSION, ns, POOLS, "orders", {"spec": {"tiers": tiers}}
                )
                if mode == "reset":  # the operator notices at once and keeps trying
                    _wait_log(op, before, "could not scale tier high")
                else:  # a black hole answers nothing: its requests hang until restored
                    wait_for(lambda: proxy.connections() > 0 and proxy.accepted > 0, timeout=10,
                             message="the operator talking into the black hole")  # fmt: skip
                assert replicas(k8s_api, ns, "orders-high") == wanted - 2
                proxy.restore()

                def converged(want: int = wanted, concurrency: int = tiers[2]["concurrency"]) -> bool:
                    pool = wait_ready(k8s_api, ns, "orders", timeout=5)
                    args = deployments(k8s_api, ns, "orders")["orders-low"].spec.template.spec.containers[0].args
                    return (replicas(k8s_api, ns, "orders-high") == want
                            and tier_status(pool, "high").get("desiredReplicas") == want
                            and args[args.index("--concurrency") + 1] == str(concurrency))  # fmt: skip

                wait_for(converged, timeout=60, message=f"converged after the {mode} outage")
            _expect_children(k8s_api, ns, "orders")
            assert op.proc is not None and op.proc.poll() is None, "the operator died in the outage"
        finally:
            EVIDENCE.capture_namespace(k8s_api, ns)
            EVIDENCE.capture_operator(op, f"operator of {ns}")
            op.stop()
    EVIDENCE.assert_clean()
