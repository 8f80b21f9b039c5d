"""Shared fixtures: the real local control plane, real Redis, fresh namespaces."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import ROOT, Cluster, ensure_cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

CRD_DIR = Path(os.environ.get("CELERY_FLEET_CRD_DIR", ROOT / "crds"))
# Namespaces of this pytest session share a prefix, so this session's operator watches
# only them and several test runs can share one local cluster.
SESSION_PREFIX = f"t{uuid.uuid4().hex[:4]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test, marked or not.
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _fresh_kombu_pools() -> None:
    """Celery apps share kombu's process-wide connection pools, keyed by broker URL: a connection
    pooled before a test stopped, restarted or CLIENT KILLed the shared Redis would come back dead
    ("Connection closed by server") in a later test's fresh app. Each test starts with none."""
    import sys

    pools = sys.modules.get("kombu.pools")
    if pools is not None:
        pools.reset()


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return ensure_cluster()


@pytest.fixture(scope="session")
def k8s_api(cluster: Cluster):  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    yield api
    api.close()


@pytest.fixture(scope="session")
def crds_installed(cluster: Cluster) -> list[str]:
    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        pytest.fail(f"no generated CRDs in {CRD_DIR}: run `make crds`")
    for f in files:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
    names = []
    for f in files:
        import yaml

        names.append(yaml.safe_load(f.read_text())["metadata"]["name"])
    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
    return names


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{SESSION_PREFIX}-{base}"[:56].rstrip("-") + f"-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        timeout=30,
        message=f"default ServiceAccount in {name}",
    )
    yield name
    if not os.environ.get("KEEP_NAMESPACES"):
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def unwatched_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace no operator of this session watches: for tests that write status by hand."""
    name = f"u-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    redis_server.start()  # a previous test may have stopped it on purpose
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def operator(cluster: Cluster, crds_installed: list[str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real operator process watching this session's namespaces."""
    proc = OperatorProcess(
        cluster.kubeconfig, [f"{SESSION_PREFIX}-*"], tmp_path_factory.mktemp("operator") / "operator.log"
    )
    proc.start()
    _warm_up(cluster, proc)
    yield proc
    proc.stop()


def _warm_up(cluster: Cluster, proc: OperatorProcess) -> None:
    """Wait until the operator acts in a namespace of this session.

    Kopf 1.45, watching namespaces by glob, misses a namespace created while its namespace watch
    starts (right after the operator did); one reaction in a fresh namespace shows that window
    is over for every namespace the tests create afterwards.
    """
    from tests.support.faults import until_watched

    ns = f"{SESSION_PREFIX}-warmup-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    pool = {
        "apiVersion": "celeryfleet.io/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": "warmup"},
        "spec": {"app": "a", "image": "example/warmup:1", "broker": {"url": "redis://127.0.0.1:1/0"}},
    }
    import json

    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pool))
    until_watched(
        cluster,
        ns,
        lambda: cluster.kubectl("get", "deployment", "warmup-high", "-n", ns, check=False).returncode == 0,
        timeout=120,
    )
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
