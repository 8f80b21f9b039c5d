"""Issue 9, faults: the operator, the apiserver and other writers fail mid-flight; the cluster still converges.

Tests that kill or cut off the operator run their own operator process on their own
namespace (`f-...`), which the session operator does not watch.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import (
    BEATS,
    EVIDENCE,
    GROUP,
    POOLS,
    VERSION,
    ReplicaRecorder,
    apiserver_address,
    apply,
    assert_single_owner,
    beat_manifest,
    broker_secret,
    condition,
    deployments,
    events,
    get_pool,
    own_namespace,
    pool_manifest,
    proxied_kubeconfig,
    push_backlog,
    replicas,
    started_operator,
    tier,
    tier_status,
    until_watched,
    wait_condition,
    wait_converged,
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
            wait_converged(k8s_api, ns, "orders")
            _expect_children(k8s_api, ns, "orders")

            # 2. Killed right after a scale-up, before the status could follow.
            broker = secured_redis.client()
            push_backlog(broker, "high_priority", 50)
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 5, timeout=30, interval=0.05,
                     message="high scaled to 5")  # fmt: skip
            op.kill()
            # A big fleet's Deployment list takes longer than its pool list: a restarted operator
            # must not reconcile pools before their Deployments are in its cache (it would take
            # them for missing and apply them at replicas.min).
            _slow_down_deployment_listing(k8s_api, ns)
            with ReplicaRecorder(k8s_api, ns) as recorder:
                mark = recorder.mark("orders-high")
                push_backlog(broker, "high_priority", 20)  # 70 queued: 7 replicas, for the restarted operator
                op.start()
                wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 7, timeout=30, message="high scaled to 7")

                # 3. Killed mid-scale: the scale landed, its Event and status had not.
                push_backlog(broker, "medium_priority", 40)
                wait_for(lambda: replicas(k8s_api, ns, "orders-medium") == 4, timeout=30, interval=0.02,
                         message="medium scaled to 4")  # fmt: skip
                op.kill()
                op.start()

                def converged() -> dict[str, Any] | None:
                    pool = wait_converged(k8s_api, ns, "orders", timeout=5)
                    ok = (tier_status(pool, "high").get("desiredReplicas") == 7
                          and tier_status(pool, "medium").get("desiredReplicas") == 4)  # fmt: skip
                    return pool if ok else None

                wait_for(converged, timeout=60, message="status converged on 7 high, 4 medium")
            # Never reset to the minimum (1) by a restarted operator: the lowest value seen after the
            # first kill is the 5 the tier had then.
            assert recorder.lowest_since("orders-high", mark) >= 5, recorder.seen["orders-high"]
            assert min(recorder.seen["orders-medium"][-3:]) >= 1
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
            wait_converged(k8s_api, ns, "orders")
            broker = secured_redis.client()
            push_backlog(broker, "high_priority", 30)
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 3, timeout=30, message="high scaled to 3")

            for mode in ("reset", "blackhole"):
                proxy.cut(mode)
                before = len(op.logs())
                # While the operator cannot reach the apiserver: more work arrives and the spec changes.
                push_backlog(broker, "high_priority", 20)
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
                    pool = wait_converged(k8s_api, ns, "orders", timeout=5)
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


def _broker_errors(op: OperatorProcess, kind: str) -> float:
    """The operator's count of failed broker reads of one kind (celery_fleet_broker_errors_total)."""
    for line in op.metrics().splitlines():
        if line.startswith("celery_fleet_broker_errors_total{") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_redis_slow_unreachable_erroring_or_restarted_holds_reports_and_recovers(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    secured_redis: RedisServer,
) -> None:  # fmt: skip
    ns, password = namespace, secured_redis.password
    assert password
    with TcpProxy(secured_redis.host, secured_redis.port) as proxy:
        broker_secret(k8s_api, ns, "broker", {"url": f"redis://:{password}@127.0.0.1:{proxy.port}/0"})
        apply(cluster, ns, pool_manifest("orders", {"urlSecretRef": {"name": "broker", "key": "url"}},
                                         [tier("high", "high_priority"), tier("low", "low_priority")]))  # fmt: skip
        until_watched(cluster, ns, lambda: deployments(k8s_api, ns, "orders"))
        admin = secured_redis.client()
        push_backlog(admin, "high_priority", 30)
        wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 3, timeout=60, message="high scaled to 3")
        wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")

        def holds_through(kind: str, reason: str, held: int) -> dict[str, Any]:
            """The fault is reported, the tier holds while the operator fails several polls in a row."""
            cond = wait_condition(k8s_api, ns, "orders", "BrokerReachable", "False", reason=reason)
            start = _broker_errors(operator, kind)
            wait_for(lambda: _broker_errors(operator, kind) >= start + 3, timeout=20,
                     message=f"three more failed {kind} polls")  # fmt: skip
            assert replicas(k8s_api, ns, "orders-high") == held
            assert tier_status(get_pool(k8s_api, ns, "orders"), "high")["desiredReplicas"] == held
            return cond

        with ReplicaRecorder(k8s_api, ns) as recorder:
            # Slow: a broker that accepts and never answers; every poll times out.
            proxy.cut("blackhole")
            cond = holds_through("Timeout", "BrokerTimeout", 3)
            assert "no answer in time" in cond["message"] and "replicas are held" in cond["message"], cond
            proxy.restore()
            wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")

            # Unreachable: connections refused and reset.
            proxy.cut("reset")
            holds_through("Unreachable", "BrokerUnreachable", 3)
            proxy.restore()
            wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")

            # Credentials changed under the operator (CONFIG SET requirepass; its connections dropped).
            new_password = EVIDENCE.password("rotated")
            admin.config_set("requirepass", new_password)
            admin = redis.Redis(host=secured_redis.host, port=secured_redis.port, password=new_password)
            admin.client_kill_filter(_type="normal", skipme=True)
            cond = holds_through("AuthFailed", "BrokerAuthFailed", 3)
            admin.config_set("requirepass", password)
            admin = secured_redis.client()
            wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")

            # Errors: the low tier's queue name taken by a key of the wrong type (WRONGTYPE).
            # The high tier, on a healthy queue, keeps scaling meanwhile.
            admin.set("low_priority", "not a list")
            cond = wait_condition(k8s_api, ns, "orders", "BrokerReachable", "False", reason="BrokerResponseError")
            assert "low_priority" in cond["message"] and "WRONGTYPE" in cond["message"], cond
            push_backlog(admin, "high_priority", 20)
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 5, timeout=30, message="high still scales")
            assert replicas(k8s_api, ns, "orders-low") == 1
            admin.delete("low_priority")
            wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")

            # Restarted: down (reported, held), then back empty (no persistence): scales in by itself.
            mark = recorder.mark("orders-high")
            secured_redis.stop()
            holds_through("Unreachable", "BrokerUnreachable", 5)
            assert recorder.lowest_since("orders-high", 0) >= 3, recorder.seen["orders-high"]
            assert recorder.lowest_since("orders-high", mark) == 5, recorder.seen["orders-high"]
            secured_redis.start()
            wait_condition(k8s_api, ns, "orders", "BrokerReachable", "True")
            wait_for(lambda: replicas(k8s_api, ns, "orders-high") == 1, timeout=30, message="empty queue: back to 1")
        wait_converged(k8s_api, ns, "orders")
        reasons = [e.reason for e in events(k8s_api, ns, "orders") if e.type == "Warning"]
        for reason in ("BrokerTimeout", "BrokerUnreachable", "BrokerAuthFailed", "BrokerResponseError"):
            assert reason in reasons, reasons
        EVIDENCE.capture_namespace(k8s_api, ns)
    EVIDENCE.assert_clean()


def test_concurrent_writers_during_a_rollout_are_overruled(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    """Other writers change the children and the status mid-rollout; the operator's view wins, without 409s.

    Every operator write is a server-side apply with force, a merge patch of the scale
    subresource, or a merge patch of status: none carries a resourceVersion, so none can
    fail with 409 Conflict; a field another manager took over is taken back.
    """
    ns = namespace
    apply(cluster, ns, pool_manifest("orders", {"url": redis_server.url}))
    until_watched(cluster, ns, lambda: deployments(k8s_api, ns, "orders"))
    wait_converged(k8s_api, ns, "orders")
    apps, custom = client.AppsV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    before = len(operator.logs())

    # The rollout: the medium tier's concurrency changes...
    pool = get_pool(k8s_api, ns, "orders")
    tiers = pool["spec"]["tiers"]
    tiers[1]["concurrency"] = 5
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, POOLS, "orders", {"spec": {"tiers": tiers}})
    # ...while a person edits that tier's Deployment by hand (an update on a fresh resourceVersion),
    # retrying on 409 as kubectl edit does: the operator's rollout may land between its read and write.
    conflicts: list[int] = []

    def hand_edit() -> bool:
        medium = apps.read_namespaced_deployment("orders-medium", ns)
        medium.spec.template.spec.containers[0].args = ["-A", "hand-edited", "worker"]
        try:
            apps.replace_namespaced_deployment("orders-medium", ns, medium)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            conflicts.append(exc.status)
            return False
        return True

    wait_for(hand_edit, timeout=20, interval=0.05, message="the hand edit landed")
    # a second writer forcibly takes over the high tier's image with its own server-side apply,
    container = {"name": "worker", "image": "evil:latest"}
    takeover = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orders-high", "namespace": ns},
                "spec": {"template": {"spec": {"containers": [container]}}}}  # fmt: skip
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager", "intruder", "-f", "-",
                    input=json.dumps(takeover))  # fmt: skip
    # and a third writes the pool's status.
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, POOLS, "orders", {"status": {
        "replicas": 999, "conditions": [{"type": "Ready", "status": "False", "reason": "Forged", "message": "x",
                                         "lastTransitionTime": "2020-01-01T00:00:00Z"}]}})  # fmt: skip

    def converged() -> bool:
        deps = deployments(k8s_api, ns, "orders")
        args = deps["orders-medium"].spec.template.spec.containers[0].args
        image = deps["orders-high"].spec.template.spec.containers[0].image
        status = wait_converged(k8s_api, ns, "orders", timeout=2)["status"]
        return (args[args.index("--concurrency") + 1] == "5" and "hand-edited" not in args
                and image == "ghcr.io/example/celery-app:1.0" and status["replicas"] != 999
                and condition({"status": status}, "Ready")["reason"] != "Forged")  # fmt: skip

    wait_for(converged, timeout=60, message=lambda: f"writers overruled: {get_pool(k8s_api, ns, 'orders')['status']}")
    high = apps.read_namespaced_deployment("orders-high", ns)
    owners = {m.manager: json.dumps(m.fields_v1) for m in high.metadata.managed_fields or []}
    assert '"f:image"' in owners["celery-fleet"], owners
    assert '"f:image"' not in owners.get("intruder", ""), owners
    _expect_children(k8s_api, ns, "orders")
    log = operator.logs()[before:]
    assert " 409 " not in log and "Conflict" not in log, log[-3000:]


def test_namespace_deleted_with_pools_and_beats_goes_completely(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    secured_redis: RedisServer,
) -> None:  # fmt: skip
    ns = namespace
    broker_secret(k8s_api, ns, "broker", {"url": secured_redis.url})
    by_secret = {"urlSecretRef": {"name": "broker", "key": "url"}}
    apply(cluster, ns, pool_manifest("orders", by_secret))
    apply(cluster, ns, pool_manifest("reports", by_secret, [tier("batch", "batch")]))
    apply(cluster, ns, beat_manifest("clock", by_secret))
    until_watched(cluster, ns, lambda: deployments(k8s_api, ns, "orders"))
    push_backlog(secured_redis.client(), "batch", 30)
    wait_for(lambda: replicas(k8s_api, ns, "reports-batch") == 3, timeout=60, message="reports scaled to 3")
    wait_converged(k8s_api, ns, "orders")
    custom = client.CustomObjectsApi(k8s_api)
    wait_for(lambda: client.CoreV1Api(k8s_api).read_namespaced_service_account("clock-beat", ns), timeout=30,
             message="beat children")  # fmt: skip
    for plural in (POOLS, BEATS):
        for obj in custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]:
            assert not obj["metadata"].get("finalizers"), obj["metadata"]
    EVIDENCE.capture_namespace(k8s_api, ns)
    before = len(operator.logs())

    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    core = client.CoreV1Api(k8s_api)

    def gone() -> bool:
        try:
            core.read_namespace(ns)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    def left() -> str:
        return cluster.kubectl("get", "all", "-n", ns, check=False).stdout

    wait_for(gone, timeout=90, interval=0.5, message=lambda: f"namespace {ns} gone; left: {left()}")
    log = operator.logs()[before:]
    assert "crashed" not in log and "Traceback" not in log, log[-3000:]
    assert f'namespace="{ns}"' not in _pools_gauge(operator), "the operator still counts a deleted pool"
    EVIDENCE.assert_clean()


def _pools_gauge(op: OperatorProcess) -> str:
    return "\n".join(line for line in op.metrics().splitlines() if line.startswith("celery_fleet_desired_replicas{"))
