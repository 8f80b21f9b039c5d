"""Issue 24 item 5: the operator is not a network pivot. A pool pointing at a destination the broker
policy refuses gets BrokerReachable=False, reason BrokerRefusedByPolicy, naming the host and the
flag to change, and the operator never connects there: a listening socket at that address records
no accept. A canary listener the policy allows does record accepts (so the probe can see one), and a
pool on an allowed real Redis scales as usual beside the refused ones.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import TracebackType

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import (
    apply,
    broker_secret,
    own_namespace,
    pool_manifest,
    push_backlog,
    replicas,
    tier,
    until_watched,
    wait_condition,
)
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

REFUSED = "BrokerRefusedByPolicy"


class Listener:
    """A TCP socket that accepts and counts connections (and closes them at once)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _created(cluster: Cluster, ns: str, deployment: str) -> bool:
    return cluster.kubectl("get", "deployment", deployment, "-n", ns, check=False).returncode == 0


def _operator(cluster: Cluster, ns: str, log: Path, *extra: str, allow_loopback: bool) -> OperatorProcess:
    proc = OperatorProcess(cluster.kubeconfig, [ns], log, *extra, allow_loopback=allow_loopback)
    proc.start()
    return proc


def test_default_policy_refuses_loopback_without_connecting(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], tmp_path: Path
) -> None:
    """The production default: a pool naming the operator's own loopback (or an empty host) is refused."""
    password = "pivot-secret-7f3a"
    with Listener("127.0.0.1") as home, own_namespace(cluster, "bp") as ns:
        broker_secret(k8s_api, ns, "home", {"url": f"redis://:{password}@127.0.0.1:{home.port}/0"})
        broker_secret(k8s_api, ns, "empty", {"url": f"redis://:{password}@:{home.port}/0"})
        op = _operator(cluster, ns, tmp_path / "operator.log", allow_loopback=False)
        try:
            for name in ("home", "empty"):
                apply(cluster, ns, pool_manifest(name, {"urlSecretRef": {"name": name, "key": "url"}},
                                                 [tier("work", f"work-{name}")]))  # fmt: skip
            until_watched(cluster, ns, lambda: _created(cluster, ns, "home-work"))
            for name, host in (("home", "127.0.0.1"), ("empty", "localhost")):
                cond = wait_condition(k8s_api, ns, name, "BrokerReachable", "False", reason=REFUSED, timeout=60)
                message = cond["message"]
                assert host in message and "loopback" in message and "--broker-allow=" in message, message
                assert "no connection is made" in message and password not in message
            # Polls go on every second; several rounds later still not one connection.
            wait_for(lambda: "RefusedByPolicy" in op.metrics(), timeout=30, message="refusals counted")
            assert op.metric('celery_fleet_broker_errors_total{kind="RefusedByPolicy"}') >= 2
            assert home.accepted == 0
            assert password not in op.logs()
        finally:
            op.stop()
    assert home.accepted == 0


def test_denied_address_gets_the_condition_while_allowed_brokers_work(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], tmp_path: Path
) -> None:
    """An explicit deny inside an allowed range: refused and never touched; the canary (allowed) is
    connected to, so the probe sees connections when there are any; a real Redis pool scales."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with Listener("127.0.0.3") as denied, Listener("127.0.0.4") as canary, own_namespace(cluster, "bp") as ns:
            op = _operator(cluster, ns, tmp_path / "operator.log", "--broker-deny", "127.0.0.3/32",
                           allow_loopback=True)  # fmt: skip
            try:
                brokers = {
                    "denied": f"redis://127.0.0.3:{denied.port}/0",
                    "canary": f"redis://127.0.0.4:{canary.port}/0",
                    "real": redis.url,
                }
                for name, url in brokers.items():
                    apply(cluster, ns, pool_manifest(name, {"url": url}, [tier("work", f"work-{name}")]))
                until_watched(cluster, ns, lambda: _created(cluster, ns, "real-work"))
                cond = wait_condition(k8s_api, ns, "denied", "BrokerReachable", "False", reason=REFUSED, timeout=60)
                assert "127.0.0.3" in cond["message"] and "--broker-deny=127.0.0.3/32" in cond["message"]
                wait_for(lambda: canary.accepted > 0, timeout=60, message="the canary listener is connected to")
                canary_cond = wait_condition(k8s_api, ns, "canary", "BrokerReachable", "False", timeout=60)
                assert canary_cond["reason"] != REFUSED
                push_backlog(redis.client(), "work-real", 30)
                wait_for(lambda: replicas(k8s_api, ns, "real-work") == 3, timeout=60, message="the real pool scaled")
                assert denied.accepted == 0
            finally:
                op.stop()
        assert denied.accepted == 0
    finally:
        redis.stop()
