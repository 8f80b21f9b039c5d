"""Issue 23 items 6 and 9 with the real operator, a real Redis and (for prefetch) real workers.

- Prefetch: a pool of the plain app on Celery's defaults (early ack, default prefetch multiplier)
  gets `worker_disable_prefetch` from the operator, so a busy worker at concurrency 1 leaves the next
  message in the queue, where a new pod can take it; with `disablePrefetch: false` the same worker
  holds it reserved (in `unacked`) behind its running task: the control that shows the test can fail.
- Unrouted work: a task sent without a route lands in Celery's default queue `celery`; a pool whose
  tiers do not consume it says so in `QueuesConsumed=False` and a Warning Event, and again when it
  empties.
"""

from __future__ import annotations

import json
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
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"
TASK_SECONDS = 6.0


@pytest.fixture
def localrun(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[LocalRuntime]:
    runtime = LocalRuntime(cluster, namespace, tmp_path, pythonpath=ROOT / "tests" / "support")
    yield runtime
    runtime.stop()


def _pool(name: str, queue: str, *, replicas: int, broker: dict[str, Any], hi: int = 0, **tier: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "plainapp",
            "image": "local/plainapp:dev",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}, **broker},
            "podLabels": RUN_LABELS,
            "tiers": [
                {"name": "work", "queues": [queue], "concurrency": 1, "terminationGracePeriodSeconds": 5,
                 "replicas": {"min": replicas, "max": max(replicas, hi)}, **tier},
            ],
        },
    }  # fmt: skip


def _setup(cluster: Cluster, k8s_api: client.ApiClient, namespace: str, url: str, pool: dict[str, Any]) -> None:
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": url}}
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))


def _producer(url: str, keyprefix: str = "") -> Celery:
    app = Celery("producer", broker=url)
    app.conf.broker_connection_retry_on_startup = False
    if keyprefix:
        app.conf.broker_transport_options = {"global_keyprefix": keyprefix}
    return app


@pytest.mark.parametrize("disable_prefetch", [True, False], ids=["default-no-prefetch", "prefetch-control"])
def test_a_busy_worker_of_the_plain_app_leaves_the_next_message_queued(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any, localrun: LocalRuntime, disable_prefetch: bool,
) -> None:  # fmt: skip
    queue = f"work-{namespace[-6:]}"
    tier = {} if disable_prefetch else {"disablePrefetch": False}  # the default is what is tested
    _setup(cluster, k8s_api, namespace, redis_server.url, _pool("pf", queue, replicas=1, broker={}, **tier))
    app = _producer(redis_server.url)
    pods = wait_for(lambda: client.CoreV1Api(k8s_api).list_namespaced_pod(namespace).items, timeout=60,
                    message="the tier's pod")  # fmt: skip
    # The worker is up when it answers remote control under the name the operator gave it.
    node = [f"celery@{pods[0].metadata.name}"]
    wait_for(lambda: app.control.ping(destination=node, timeout=0.5), timeout=120,
             message=lambda: f"{node} answers ping; localrun:\n{localrun.logs()[-1500:]}")  # fmt: skip
    (conf,) = app.control.inspect(destination=node, timeout=2).conf().values()
    assert conf.get("worker_disable_prefetch") is disable_prefetch or (
        not disable_prefetch and "worker_disable_prefetch" not in conf
    ), conf

    # The second message is sent once the first runs: two sent together can both be fetched in the
    # moment before the first starts (one BRPOP each while the pool is still free), under any setting.
    with app.connection_for_write() as conn:
        app.send_task("plainapp.hold", args=[TASK_SECONDS], queue=queue, connection=conn)
        wait_for(lambda: redis_db.llen("plain:started") == 1, timeout=30, message="the first task started")
        app.send_task("plainapp.hold", args=[TASK_SECONDS], queue=queue, connection=conn)
    # While the first task runs (until its done record), watch where the second message is.
    seen: set[tuple[int, int]] = set()

    def first_done() -> bool:
        state = (redis_db.llen(queue), redis_db.hlen("unacked"))
        if redis_db.llen("plain:done") == 0:  # read before the task recorded its end: it was still running
            seen.add(state)
            return False
        return True

    wait_for(first_done, timeout=TASK_SECONDS + 20, interval=0.05, message="the first task done")
    wait_for(lambda: redis_db.llen("plain:done") == 2, timeout=TASK_SECONDS + 20, message="both tasks done")
    print(f"disablePrefetch={disable_prefetch}: (queued, unacked) seen while the first task ran: {sorted(seen)}")
    if disable_prefetch:
        # Early ack: the running task is in neither; the next message never left the queue.
        assert seen == {(1, 0)}, seen
    else:
        assert (0, 1) in seen, seen  # Celery's prefetch: reserved behind the running task


def _condition(k8s_api: client.ApiClient, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    pool = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def _event(k8s_api: client.ApiClient, namespace: str, name: str, reason: str) -> client.CoreV1Event | None:
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    return next((e for e in events if e.involved_object.name == name and e.reason == reason), None)


def test_a_task_sent_without_a_route_that_no_tier_consumes_is_reported(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any,
) -> None:  # fmt: skip
    # A key prefix of its own: pools of other tests on this Redis (the default tiers consume celery) stay apart.
    prefix = f"{namespace[-6:]}:"
    pool = _pool("unrouted", "reports", replicas=0, hi=1, broker={"globalKeyprefix": prefix})
    _setup(cluster, k8s_api, namespace, redis_server.url, pool)
    wait_for(lambda: (_condition(k8s_api, namespace, "unrouted", "BrokerReachable") or {}).get("status") == "True",
             timeout=60, message="the pool is polled")  # fmt: skip

    app = _producer(redis_server.url, prefix)
    app.send_task("plainapp.hold", args=[0.1])  # no queue, no route: Celery's default queue
    assert redis_db.llen(f"{prefix}celery") == 1

    def unconsumed() -> dict[str, Any] | None:
        found = _condition(k8s_api, namespace, "unrouted", "QueuesConsumed")
        return found if found and found["status"] == "False" else None

    condition = wait_for(unconsumed, timeout=30, message="QueuesConsumed=False")
    assert condition["reason"] == "UnconsumedQueue"
    assert "celery (1 messages)" in condition["message"] and "spec.tiers[].queues" in condition["message"]
    event = wait_for(lambda: _event(k8s_api, namespace, "unrouted", "UnconsumedQueue"), timeout=30,
                     message="the UnconsumedQueue Event")  # fmt: skip
    assert event.type == "Warning" and "celery (1 messages)" in event.message

    redis_db.delete(f"{prefix}celery")  # taken by someone: nothing waits any more
    wait_for(lambda: (_condition(k8s_api, namespace, "unrouted", "QueuesConsumed") or {}).get("reason")
             == "NothingWaiting", timeout=30, message="QueuesConsumed=True once it empties")  # fmt: skip
    wait_for(lambda: _event(k8s_api, namespace, "unrouted", "NothingWaiting"), timeout=30,
             message="the NothingWaiting Event")  # fmt: skip
    # The pool's own health is untouched: unrouted work is reported, not a reason to be unready.
    assert (_condition(k8s_api, namespace, "unrouted", "Ready") or {}).get("status") == "True"
