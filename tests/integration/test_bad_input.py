"""Issue 9, bad input: manifests beyond what the schema rejects get a clear condition, nothing crashes,
and the other pools of the same operator keep working.

Each case either fails admission with an error naming the field, or is accepted and then
reported on the object's conditions, naming the field and the fix.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.faults import (
    BEATS,
    EVIDENCE,
    GROUP,
    VERSION,
    apply,
    beat_manifest,
    broker_secret,
    condition,
    deployments,
    get_pool,
    pool_manifest,
    push_backlog,
    replicas,
    tier,
    until_watched,
    wait_converged,
)
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """Set a dotted path (list items by index) in a manifest."""

    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return mutate


# -- rejected at admission: the apiserver's answer names the field -----------------------------------------

# fmt: off
REJECTED = [
    pytest.param(_set("spec.tiers.0.replicas.max", 10**12), "spec.tiers[0].replicas.max", id="enormous-max"),
    pytest.param(_set("spec.tiers.0.concurrency", 2**70), "spec.tiers[0].concurrency", id="beyond-int64"),
    pytest.param(
        _set("spec.tiers.0.autoscaling.targetDepthPerReplica", 10**9),
        "spec.tiers[0].autoscaling.targetDepthPerReplica",
        id="enormous-target",
    ),
    pytest.param(_set("spec.tiers.0.replicas.min", -1), "spec.tiers[0].replicas.min", id="negative-min"),
    pytest.param(_set("spec.tiers.0.queues", ["two words"]), "spec.tiers[0].queues[0]", id="queue-with-space"),
    pytest.param(_set("spec.tiers.0.queues", ["line\nbreak"]), "spec.tiers[0].queues[0]", id="queue-with-newline"),
    pytest.param(_set("spec.tiers.0.queues", ["q" * 201]), "spec.tiers[0].queues[0]", id="queue-too-long"),
    pytest.param(_set("spec.tiers.0.name", "hôch"), "spec.tiers[0].name", id="unicode-tier-name"),
    pytest.param(_set("metadata.name", "pool-ünïcödé"), "metadata.name", id="unicode-pool-name"),
    pytest.param(_set("metadata.name", "p" * 64), "metadata.name", id="pool-name-too-long"),
    pytest.param(_set("spec.broker", {"url": "unix:///var/run/redis.sock"}), "spec.broker.url", id="unix-socket"),
    pytest.param(
        _set("spec.broker", {"url": "redis://:hunter2@redis:6379/0"}), "spec.broker.url", id="password-in-spec"
    ),
    pytest.param(
        _set("spec.broker", {"url": "redis://redis:6379/0?password=hunter2"}), "spec.broker.url", id="password-in-query"
    ),
    pytest.param(
        _set("spec.broker", {"url": "redis://redis:6379/0", "urlSecretRef": {"name": "s", "key": "url"}}),
        "spec.broker",
        id="both-url-and-secret",
    ),
    pytest.param(_set("spec.broker.prioritySteps", [9, 0]), "spec.broker.prioritySteps", id="steps-unsorted"),
]
# fmt: on


@pytest.mark.parametrize(("mutate", "field"), REJECTED)
def test_admission_rejects_naming_the_field(
    cluster: Cluster, crds_installed: list[str], mutate: Mutation, field: str
) -> None:
    pool = pool_manifest("bad", {"url": "redis://redis:6379/0"})
    mutate(pool)
    # A server-side dry run: full admission (schema, CEL, name rules), nothing stored.
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(pool),
                           check=False)  # fmt: skip
    assert proc.returncode != 0, f"accepted: {json.dumps(pool)[:300]}"
    assert field in proc.stderr, proc.stderr


# -- accepted, then reported ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str  # the pool's name
    condition: str  # the condition that reports it
    status: str
    reason: str
    words: tuple[str, ...]  # the message names the field and the fix
    broker: dict[str, Any] | None = None
    secret: dict[str, str | bytes] | None = None  # Secret "<name>" with these keys
    mutate: Mutation | None = None


def _cases(good_url: str, host: str, port: int, password: str) -> list[Case]:
    def by_secret() -> dict[str, Any]:
        return {"urlSecretRef": {"name": "", "key": "url"}}  # the name is the case's Secret, filled in later

    return [
        Case("wrong-key", "Degraded", "True", "BrokerSecretMissing", ("spec.broker.urlSecretRef", "'url'"),
             by_secret(), {"uri": good_url}),
        Case("no-secret", "Degraded", "True", "BrokerSecretMissing", ("spec.broker.urlSecretRef", "Create it"),
             {"urlSecretRef": {"name": "does-not-exist", "key": "url"}}),
        Case("empty-value", "Degraded", "True", "BrokerSecretEmpty", ("spec.broker.urlSecretRef", "empty"),
             by_secret(), {"url": ""}),
        Case("not-a-url", "Degraded", "True", "BrokerSecretInvalid", ("spec.broker.urlSecretRef", "redis://"),
             by_secret(), {"url": "hello world"}),
        Case("binary-value", "Degraded", "True", "BrokerSecretInvalid", ("spec.broker.urlSecretRef",),
             by_secret(), {"url": b"\xff\xfe\x00redis"}),
        Case("bad-port", "Degraded", "True", "BrokerSecretInvalid", ("spec.broker.urlSecretRef", "cannot be parsed"),
             by_secret(), {"url": f"redis://:{password}@{host}:99999/0"}),
        Case("port-not-number", "Degraded", "True", "BrokerSecretInvalid", ("spec.broker.urlSecretRef",),
             by_secret(), {"url": f"redis://:{password}@{host}:abc/0"}),
        Case("bad-option", "Degraded", "True", "BrokerSecretInvalid", ("'socket_timeout'", "spec.broker.tls"),
             by_secret(), {"url": f"redis://{host}:{port}/0?socket_timeout=soon"}),
        Case("host-in-query", "Degraded", "True", "BrokerSecretInvalid", ("'host'", "ssl_cert_reqs=required"),
             by_secret(), {"url": f"redis://:{password}@{host}:{port}/0?host=10.0.0.1"}),
        Case("password-behind-failover", "Degraded", "True", "BrokerSecretInvalid", ("segment 2", "number"),
             by_secret(), {"url": f"redis://{host}:{port}/0;redis://:{password}@{host}:{port}/x"}),
        Case("db-not-number", "Degraded", "True", "InvalidSpec", ("spec.broker.url", "must be a number"),
             {"url": f"redis://{host}:{port}/zero"}),
        Case("tls-to-plain", "BrokerReachable", "False", "BrokerTimeout", ("(TLS)", "replicas are held"),
             {"url": f"rediss://{host}:{port}/0"}),
        Case("unbalanced-ipv6", "Degraded", "True", "InvalidSpec", ("spec.broker.url", "cannot be parsed"),
             {"url": f"redis://[::1:{port}/0"}),
        Case("queue-named-unacked", "BrokerReachable", "False", "BrokerResponseError", ("unacked", "WRONGTYPE"),
             {"url": good_url}, mutate=_set("spec.tiers", [tier("q", "unacked")])),
        Case("bad-pod-label", "Degraded", "True", "ChildRejected", ("bad-pod-label-q", "labels", "not a label value!"),
             {"url": good_url}, mutate=_set("spec.podLabels", {"team": "not a label value!"})),
        Case("bad-quantity", "Degraded", "True", "ChildRejected", ("bad-quantity-q", "quantities"),
             {"url": good_url}, mutate=_set("spec.tiers", [{**tier("q", "qty"), "resources": {
                 "limits": {"cpu": "lots"}}}])),
    ]  # fmt: skip


def test_bad_manifests_are_reported_and_other_pools_keep_scaling(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, redis_db: Any,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    ns = namespace
    before = len(operator.logs())
    password = EVIDENCE.password("badinput")
    host, port = redis_server.host, redis_server.port
    good = redis_server.url
    redis_db.hset("unacked", "tag", json.dumps([{"body": ""}, "", "other"]))  # kombu's in-flight hash

    # The healthy pool first: it must keep scaling while the others fail around it.
    apply(cluster, ns, pool_manifest("healthy", {"url": good}, [tier("work", "work")]))
    until_watched(cluster, ns, lambda: deployments(k8s_api, ns, "healthy"))

    cases = _cases(good, host, port, password)
    for case in cases:
        broker = copy.deepcopy(case.broker or {"url": good})
        if "urlSecretRef" in broker and not broker["urlSecretRef"]["name"]:
            broker["urlSecretRef"]["name"] = f"{case.name}-broker"
        if case.secret is not None:
            broker_secret(k8s_api, ns, f"{case.name}-broker", case.secret)
        pool = pool_manifest(case.name, broker, [tier("q", f"q-{case.name}")])
        if case.mutate:
            case.mutate(pool)
        apply(cluster, ns, pool)

    # Accepted oddities that must simply work: hostile-looking queue names, maximal numbers, long names.
    odd_queues = ["jobs*", "[a-z]?", "очередь", "{hash}tag", "back\\slash", "quote'\"", "%s%n"]
    apply(cluster, ns, pool_manifest("odd-queues", {"url": good}, [
        {**tier("q", "x"), "queues": odd_queues, "replicas": {"min": 1, "max": 20}}]))  # fmt: skip
    maximal = tier("big", "big", lo=0, hi=1000, targetDepthPerReplica=1_000_000, scaleDownStabilizationSeconds=3600,
                   cooldownSeconds=86400, scaleUpMaxStep=1000)  # fmt: skip
    maximal.update(concurrency=1024, prefetchMultiplier=128, maxTasksPerChild=1_000_000,
                   softTimeLimitSeconds=86399, timeLimitSeconds=86400, terminationGracePeriodSeconds=86400)  # fmt: skip
    apply(cluster, ns, {**pool_manifest("maximal", {"url": good}, [maximal]),
                        "spec": {**pool_manifest("maximal", {"url": good}, [maximal])["spec"],
                                 "maxTotalReplicas": 10000}})  # fmt: skip
    long_name, long_tier = "p" * 63, "t" * 63
    apply(cluster, ns, pool_manifest(long_name, {"url": good}, [tier(long_tier, "long")]))
    broker_secret(k8s_api, ns, "beat-broker", {"url": ""})
    apply(cluster, ns, beat_manifest("clock", {"urlSecretRef": {"name": "beat-broker", "key": "url"}}))
    labelled = beat_manifest("labelled", {"url": good})
    labelled["spec"]["podLabels"] = {"team": "not a label value!"}
    apply(cluster, ns, labelled)

    for case in cases:

        def reported(c: Case = case) -> dict[str, Any] | None:
            cond = condition(get_pool(k8s_api, ns, c.name), c.condition)
            return cond if cond.get("status") == c.status and cond.get("reason") == c.reason else None

        def why(c: Case = case) -> str:
            status = get_pool(k8s_api, ns, c.name).get("status") or {}
            return f"{c.name}: {c.condition}={c.status} {c.reason}: {status.get('conditions')}"

        cond = wait_for(reported, timeout=60, message=why)
        for word in case.words:
            assert word in cond["message"], (case.name, cond)

    # The oddities work: each hostile queue name is read literally (a backlog on "jobs*" alone scales it).
    push_backlog(redis_db, "jobs*", 25)
    push_backlog(redis_db, "очередь", 25)
    wait_for(lambda: replicas(k8s_api, ns, "odd-queues-q") == 5, timeout=30, message="odd queues scaled to 5")
    args = deployments(k8s_api, ns, "odd-queues")["odd-queues-q"].spec.template.spec.containers[0].args
    assert args[args.index("-Q") + 1] == ",".join(odd_queues), args
    wait_converged(k8s_api, ns, "maximal")
    wait_converged(k8s_api, ns, long_name)
    assert f"{long_name}-{long_tier}" in deployments(k8s_api, ns, long_name)

    def beat_degraded(name: str, reason: str) -> dict[str, Any]:
        def degraded() -> dict[str, Any] | None:
            beat = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, ns, BEATS, name)
            cond = condition(beat, "Degraded")
            return cond if cond.get("status") == "True" and cond.get("reason", "").startswith(reason) else None

        return wait_for(degraded, timeout=30, message=f"beat {name} Degraded {reason}")

    beat_degraded("clock", "BrokerSecret")
    assert "labelled-beat" in beat_degraded("labelled", "ChildRejected")["message"]

    # And the healthy pool, in the same operator, still scales both ways.
    push_backlog(redis_db, "work", 40)
    wait_for(lambda: replicas(k8s_api, ns, "healthy-work") == 4, timeout=30, message="healthy pool scaled up")
    redis_db.delete("work")
    wait_for(lambda: replicas(k8s_api, ns, "healthy-work") == 1, timeout=30, message="healthy pool scaled down")

    assert operator.proc is not None and operator.proc.poll() is None, "the operator died"
    log = operator.logs()[before:]
    assert "crashed" not in log and "Traceback" not in log, log[-4000:]
    EVIDENCE.capture_namespace(k8s_api, ns)
    EVIDENCE.assert_clean()
