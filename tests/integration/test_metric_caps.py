"""Issue 24 item 4: a pool's metric series are capped. The real operator, a real Redis: a pool with
more per-queue series than its cap shows exactly the cap, counts each series left out once in
celery_fleet_metric_series_dropped_total, is named once in the log, and still scales on the queue
whose series were left out; a small pool beside it is untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import apply, own_namespace, pool_manifest, push_backlog, replicas, tier, until_watched
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CAP = 12
QUEUES = [f"wide-{i}" for i in range(8)]  # x (4 priority lists + in flight) = 40 per-queue series
QUEUE_METRICS = ("celery_fleet_queue_depth{", "celery_fleet_queue_in_flight{")


def _lines(op: OperatorProcess, namespace: str, pool: str) -> list[str]:
    wanted = (f'namespace="{namespace}"', f'pool="{pool}"')
    lines = op.metrics().splitlines()
    return [line for line in lines if line.startswith(QUEUE_METRICS) and all(w in line for w in wanted)]


def test_series_past_the_pool_cap_are_left_out_counted_and_scaling_goes_on(
    cluster: Cluster, k8s_api: client.ApiClient, crds_installed: list[str], tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with own_namespace(cluster, "mc") as ns:
            op = OperatorProcess(cluster.kubeconfig, [ns], tmp_path / "operator.log",
                                 "--metrics-max-series-per-pool", str(CAP))  # fmt: skip
            op.start()
            try:
                wide = {**tier("work", QUEUES[0]), "queues": QUEUES}
                apply(cluster, ns, pool_manifest("wide", {"url": redis.url}, [wide]))
                apply(cluster, ns, pool_manifest("narrow", {"url": redis.url}, [tier("work", "narrow")]))
                until_watched(cluster, ns, lambda: _lines(op, ns, "narrow"))
                wait_for(lambda: len(_lines(op, ns, "wide")) == CAP, timeout=30,
                         message=lambda: "\n".join(_lines(op, ns, "wide")))  # fmt: skip
                assert len(_lines(op, ns, "narrow")) == 5  # 4 priority lists + in flight: under the cap
                dropped = f'celery_fleet_metric_series_dropped_total{{namespace="{ns}"}}'
                wait_for(lambda: op.metric(dropped) == 40 - CAP, timeout=30, message=lambda: str(op.metric(dropped)))
                # The last queue's series were left out; its backlog still scales the tier.
                assert not [line for line in _lines(op, ns, "wide") if f'queue_name="{QUEUES[-1]}"' in line]
                push_backlog(redis.client(), QUEUES[-1], 30)
                wait_for(lambda: replicas(k8s_api, ns, "wide-work") == 3, timeout=60, message="wide scaled")
                assert op.metric(dropped) == 40 - CAP  # polled again and again: each series counted once
                warnings = [line for line in op.logs().splitlines() if "metric series left out" in line]
                assert len(warnings) == 1 and f"{ns}/wide" in warnings[0], warnings
                assert len(_lines(op, ns, "wide")) == CAP
            finally:
                op.stop()
    finally:
        redis.stop()
