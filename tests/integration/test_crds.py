"""The generated CRDs in a real apiserver: samples accepted, bad objects rejected naming the field,
defaults applied, printer columns and `kubectl explain` useful."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.api import crdgen
from celery_fleet.api.models import (
    API_VERSION,
    BEAT_KIND,
    POOL_KIND,
    Autoscaling,
    InvalidSpec,
    parse_beat,
    parse_pool,
)
from tests.support.cluster import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"
PLURALS = {POOL_KIND: "celeryworkerpools", BEAT_KIND: "celerybeats"}


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_every_sample_is_accepted(cluster: Cluster, crds_installed: list[str], namespace: str, sample: str) -> None:
    path = SAMPLES / sample
    cluster.kubectl("apply", "--server-side", "--field-manager=test", "-n", namespace, "-f", str(path))
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] not in PLURALS:
            continue
        stored = get_json(cluster, PLURALS[doc["kind"]], doc["metadata"]["name"], "-n", namespace)
        parse = parse_pool if doc["kind"] == POOL_KIND else parse_beat
        # What the apiserver stored (with its defaults) means the same as what the user wrote.
        assert parse(stored) == parse(doc)


def test_apiserver_defaults_a_minimal_pool(cluster: Cluster, crds_installed: list[str], namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(SAMPLES / "pool-minimal.yaml"))
    spec = get_json(cluster, "cwp", "shop", "-n", namespace)["spec"]
    autoscaling = Autoscaling().model_dump(by_alias=True, exclude_none=True)
    assert spec["tiers"] == [
        {
            "name": name,
            "queues": queues,
            "concurrency": concurrency,
            "pool": "prefork",
            "prefetchMultiplier": 1,
            "disablePrefetch": True,
            "logLevel": "INFO",
            "replicas": {"min": low, "max": high},
            "autoscaling": autoscaling,
        }
        for name, queues, concurrency, low, high in (
            ("high", ["high_priority"], 4, 2, 8),
            ("medium", ["medium_priority", "celery"], 6, 4, 12),
            ("low", ["low_priority"], 2, 1, 4),
        )
    ]
    assert spec["broker"]["prioritySteps"] == [0, 3, 6, 9]
    assert spec["paused"] is False


def test_apiserver_defaults_a_minimal_beat(cluster: Cluster, crds_installed: list[str], namespace: str) -> None:
    beat = {
        "apiVersion": API_VERSION,
        "kind": BEAT_KIND,
        "metadata": {"name": "tiny"},
        "spec": {"app": "a", "image": "ghcr.io/example/celery-app:1.0", "broker": {"url": "redis://r:6379/0"}},
    }
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(beat))
    spec = get_json(cluster, "cbeat", "tiny", "-n", namespace)["spec"]
    assert spec["lease"] == {"durationSeconds": 15, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2}
    assert spec["standby"] == 1
    assert "scheduler" not in spec  # unset: the operator's LeaseScheduler, chosen in the pod template


# --- Invalid objects ---------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def base_pool() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": {"name": "bad"},
        "spec": {
            "app": "shop.celery:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": {"url": "redis://redis.celery.svc:6379/0"},
            "tiers": [
                {"name": "high", "queues": ["high_priority"], "concurrency": 4, "replicas": {"min": 2, "max": 8}},
                {"name": "low", "queues": ["low_priority"], "concurrency": 2, "replicas": {"min": 1, "max": 4}},
            ],
        },
    }


def base_beat() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": BEAT_KIND,
        "metadata": {"name": "bad"},
        "spec": {"app": "shop.celery:app", "image": "ghcr.io/example/celery-app:1.0", "broker": {"url": "redis://r"}},
    }


def _node(obj: dict[str, Any], parents: list[str]) -> Any:
    node: Any = obj
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def put(path: str, value: Any) -> Mutation:
    """Set a dotted path of the object (list indices as numbers)."""

    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        _node(obj, parents)[int(last) if last.isdigit() else last] = value

    return mutate


def drop(path: str) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        del _node(obj, parents)[last]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        for m in mutations:
            m(obj)

    return mutate


def tier(name: str) -> dict[str, Any]:
    return {"name": name, "queues": [f"q-{name}"], "concurrency": 1, "replicas": {"min": 0, "max": 1}}


def case(mutate: Mutation, field: str, text: str, *, kind: str = POOL_KIND, model: bool = True, id: str) -> Any:
    """One row: the mutation, the field the apiserver must name, and text its message must contain.

    `model` says whether the pydantic models see the same problem (they never see metadata).
    """
    return pytest.param(kind, mutate, field, text, model, id=id)


INVALID = [
    case(drop("spec.app"), "spec.app", "Required value", id="app-missing"),
    case(put("spec.image", ""), "spec.image", "at least 1 chars long", id="image-empty"),
    case(put("spec.broker", {}), "spec.broker", "set exactly one of url or urlSecretRef", id="broker-neither"),
    case(
        put("spec.broker.urlSecretRef", {"name": "s", "key": "url"}),
        "spec.broker",
        "set exactly one of url or urlSecretRef",
        id="broker-both",
    ),
    case(
        put("spec.broker.url", "amqp://rabbit:5672//"),
        "spec.broker.url",
        "must start with redis://, rediss:// or sentinel://",
        id="url-scheme",
    ),
    case(
        put("spec.broker.url", "redis://:hunter2@redis:6379/0"),
        "spec.broker.url",
        "must not contain a password",
        id="url-password-only",
    ),
    case(
        put("spec.broker.url", "rediss://app:hunter2@redis:6380/0"),
        "spec.broker.url",
        "must not contain a password",
        id="url-user-and-password",
    ),
    case(
        put("spec.broker.url", "redis://redis:6379/0?password=hunter2"),
        "spec.broker.url",
        "must not contain a password",
        id="url-password-query",
    ),
    case(
        put("spec.broker.url", "redis://r1:6379/0;redis://:s3cret@r2:6379/0"),
        "spec.broker.url",
        "must not contain a password",
        id="url-password-behind-failover",
    ),
    case(
        put("spec.broker.url", "redis://r1:6379/0;sentinel://s1:26379"),
        "spec.broker.url",
        "do not mix sentinel://",
        id="url-mixed-kinds",
    ),
    case(
        put("spec.broker.url", "redis://shown:6379/0?host=elsewhere"),
        "spec.broker.url",
        "the only query option supported",
        id="url-host-in-query",
    ),
    case(
        put("spec.broker", {"urlSecretRef": {"name": "s", "key": "a/b"}}),
        "spec.broker.urlSecretRef.key",
        "should match",
        id="secret-key-chars",
    ),
    case(
        put("spec.broker.prioritySteps", [0, 6, 3]),
        "spec.broker.prioritySteps",
        "must be strictly increasing",
        id="priority-steps-order",
    ),
    case(
        put("spec.broker.prioritySteps", [0, 10]),
        "spec.broker.prioritySteps[1]",
        "less than or equal to 9",
        id="priority-step-range",
    ),
    case(
        put("spec.tiers.0.replicas", {"min": 5, "max": 3}),
        "spec.tiers[0].replicas.min",
        "min must be <= max",
        id="replicas-min-over-max",
    ),
    case(put("spec.tiers.1.name", "high"), "spec.tiers", "tier names must be unique", id="tier-names-unique"),
    case(
        put("spec.tiers.1.queues", ["low_priority", "high_priority"]),
        "spec.tiers",
        "a queue may belong to at most one tier",
        id="queue-in-two-tiers",
    ),
    case(
        put("spec.tiers.0.queues", ["a", "a"]),
        "spec.tiers[0].queues",
        "must not list a queue twice",
        id="queue-twice-in-a-tier",
    ),
    case(put("spec.tiers.0.queues", []), "spec.tiers[0].queues", "at least 1 items", id="no-queues"),
    case(
        put("spec.tiers.0.queues", ["a,b"]),
        "spec.tiers[0].queues[0]",
        "must not contain commas or whitespace",
        id="queue-name-comma",
    ),
    # Every whitespace Celery strips from -Q names, not only RE2's ASCII \\s.
    case(
        put("spec.tiers.0.queues", ["nbsp\u00a0queue"]),
        "spec.tiers[0].queues[0]",
        "must not contain commas or whitespace",
        id="queue-name-nbsp",
    ),
    case(
        put("spec.tiers.0.queues", ["tab\u000bqueue"]),
        "spec.tiers[0].queues[0]",
        "must not contain commas or whitespace",
        id="queue-name-vertical-tab",
    ),
    case(put("spec.tiers.0.name", "High_Tier"), "spec.tiers[0].name", "must be a DNS label", id="tier-name"),
    case(
        put("spec.tiers.0.concurrency", 0),
        "spec.tiers[0].concurrency",
        "greater than or equal to 1",
        id="concurrency-zero",
    ),
    case(
        put("spec.tiers.0.concurrency", "four"),
        "spec.tiers[0].concurrency",
        "must be of type integer",
        id="concurrency-not-a-number",
    ),
    case(
        put("spec.tiers.0.pool", "multiprocessing"),
        "spec.tiers[0].pool",
        'supported values: "prefork"',
        id="pool-enum",
    ),
    case(put("spec.tiers.0.logLevel", "VERBOSE"), "spec.tiers[0].logLevel", "supported values", id="log-level"),
    case(
        put("spec.tiers.0.autoscaling", {"targetDepthPerReplica": 0}),
        "spec.tiers[0].autoscaling.targetDepthPerReplica",
        "greater than or equal to 1",
        id="target-depth-zero",
    ),
    case(
        both(put("spec.tiers.0.softTimeLimitSeconds", 60), put("spec.tiers.0.timeLimitSeconds", 60)),
        "spec.tiers[0].softTimeLimitSeconds",
        "softTimeLimitSeconds must be < timeLimitSeconds",
        id="soft-not-below-hard",
    ),
    case(
        both(put("spec.tiers.0.timeLimitSeconds", 300), put("spec.tiers.0.terminationGracePeriodSeconds", 30)),
        "spec.tiers[0].terminationGracePeriodSeconds",
        "terminationGracePeriodSeconds must be >= timeLimitSeconds",
        id="grace-below-time-limit",
    ),
    case(
        put("spec.tiers.0.autoscaling", {"fallbackReplicas": 20}),
        "spec.tiers[0].autoscaling.fallbackReplicas",
        "fallbackReplicas must lie within replicas.min..replicas.max",
        id="fallback-out-of-bounds",
    ),
    case(
        put("spec.tiers.0.podDisruptionBudget", {"maxUnavailable": 1, "minAvailable": 1}),
        "spec.tiers[0].podDisruptionBudget",
        "set at most one of maxUnavailable or minAvailable",
        id="pdb-both",
    ),
    case(
        put("spec.tiers.0.podDisruptionBudget", {"maxUnavailable": "half"}),
        "spec.tiers[0].podDisruptionBudget.maxUnavailable",
        "must be a non-negative integer or a percentage",
        id="pdb-not-a-percentage",
    ),
    case(
        put("spec.maxTotalReplicas", 2),
        "spec.maxTotalReplicas",
        "maxTotalReplicas must be >= the sum of the tiers' replicas.min",
        id="budget-below-minimums",
    ),
    case(put("spec.tiers", []), "spec.tiers", "at least 1 items", id="tiers-empty"),
    case(put("spec.tiers", [tier(f"t{i}") for i in range(11)]), "spec.tiers", "at most 10 items", id="tiers-too-many"),
    case(
        put("spec.tiers.0.replicaz", {"min": 1}),
        "spec.tiers[0].replicaz",
        "unknown field",
        id="unknown-field",
    ),
    case(put("spec.imagePullPolicy", "Sometimes"), "spec.imagePullPolicy", "supported values", id="pull-policy"),
    case(
        put("metadata.name", "x" * 70),
        "metadata.name",
        "at most 63 characters",
        model=False,
        id="name-too-long",
    ),
    case(put("spec.standby", 2), "spec.standby", "less than or equal to 1", kind=BEAT_KIND, id="beat-standby-two"),
    case(
        put("spec.lease", {"durationSeconds": 10, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2}),
        "spec.lease.renewDeadlineSeconds",
        "renewDeadlineSeconds must be < durationSeconds",
        kind=BEAT_KIND,
        id="beat-renew-not-below-duration",
    ),
    case(
        put("spec.lease", {"retryPeriodSeconds": 10}),
        "spec.lease.retryPeriodSeconds",
        "retryPeriodSeconds must be < renewDeadlineSeconds",
        kind=BEAT_KIND,
        id="beat-retry-not-below-renew",
    ),
    case(
        put("spec.broker.url", "redis://:hunter2@redis:6379/0"),
        "spec.broker.url",
        "must not contain a password",
        kind=BEAT_KIND,
        id="beat-url-password",
    ),
]


def rejection(k8s_api: Any, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj` as a dry run and return the apiserver's Status; fail if it was accepted."""
    from kubernetes import client

    api = client.CustomObjectsApi(k8s_api)
    try:
        api.create_namespaced_custom_object(
            "celeryfleet.io",
            "v1alpha1",
            namespace,
            PLURALS[obj["kind"]],
            obj,
            dry_run="All",
            field_validation="Strict",
        )
    except client.ApiException as error:
        status: dict[str, Any] = json.loads(error.body)
        return status
    pytest.fail(f"the apiserver accepted an invalid {obj['kind']}")


def named_cause(status: dict[str, Any], field: str, text: str) -> bool:
    causes = status.get("details", {}).get("causes", [])
    if any(c.get("field") == field and text in c.get("message", "") for c in causes):
        return True
    # Strict field validation reports unknown fields only in the top-level message.
    return f'"{field}"' in status["message"] and text in status["message"]


def test_the_invalid_table_is_large_enough() -> None:
    assert len(INVALID) >= 25


@pytest.mark.parametrize(("kind", "mutate", "field", "text", "model"), INVALID)
def test_invalid_objects_are_rejected_naming_the_field(
    k8s_api: Any,
    crds_installed: list[str],
    namespace: str,
    kind: str,
    mutate: Mutation,
    field: str,
    text: str,
    model: bool,
) -> None:
    obj = base_pool() if kind == POOL_KIND else base_beat()
    mutate(obj)
    status = rejection(k8s_api, namespace, copy.deepcopy(obj))
    assert status["code"] in (400, 422), status
    assert named_cause(status, field, text), json.dumps(status, indent=2)
    assert "hunter2" not in json.dumps(status.get("details", {}).get("causes", []))
    if model:
        # The operator reports an object that slipped past the schema at the same field.
        parse = parse_pool if kind == POOL_KIND else parse_beat
        with pytest.raises(InvalidSpec) as caught:
            parse(obj)
        assert any(re.match(rf"{re.escape(field)}[:\[.]", p) for p in caught.value.problems), caught.value.problems


VALID_EDGES = [
    pytest.param(put("spec.broker.url", "redis://default@redis:6379/0"), id="url-user-without-password"),
    pytest.param(put("spec.broker.url", "rediss://redis:6380/0?ssl_cert_reqs=required"), id="url-tls-with-query"),
    pytest.param(put("spec.broker", {"urlSecretRef": {"name": "broker", "key": "url"}}), id="url-from-secret"),
    pytest.param(put("spec.broker.prioritySteps", [0]), id="one-priority-step"),
    pytest.param(put("spec.tiers.0.podDisruptionBudget", {"maxUnavailable": "25%"}), id="pdb-percentage"),
    pytest.param(put("spec.tiers.0.podDisruptionBudget", {"minAvailable": 0}), id="pdb-min-available-zero"),
    pytest.param(put("spec.tiers.1.replicas", {"min": 0, "max": 1}), id="tier-scales-to-zero"),
    pytest.param(put("spec.maxTotalReplicas", 3), id="budget-equals-minimums"),
    pytest.param(
        both(put("spec.tiers.0.softTimeLimitSeconds", 59), put("spec.tiers.0.timeLimitSeconds", 60)),
        id="soft-just-below-hard",
    ),
    pytest.param(
        both(put("spec.tiers.0.timeLimitSeconds", 60), put("spec.tiers.0.terminationGracePeriodSeconds", 60)),
        id="grace-equals-time-limit",
    ),
    pytest.param(put("spec.tiers.0.autoscaling", {"fallbackReplicas": 8}), id="fallback-at-max"),
    pytest.param(put("spec.tiers", [tier(f"t{i}") for i in range(10)]), id="ten-tiers"),
    pytest.param(drop("spec.tiers"), id="default-tiers"),
]


@pytest.mark.parametrize("mutate", VALID_EDGES)
def test_edge_cases_are_accepted_by_both(
    k8s_api: Any, crds_installed: list[str], namespace: str, mutate: Mutation
) -> None:
    """The rules reject what they should and nothing more."""
    from kubernetes import client

    obj = base_pool()
    mutate(obj)
    parse_pool(obj)
    client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
        "celeryfleet.io", "v1alpha1", namespace, "celeryworkerpools", obj, dry_run="All", field_validation="Strict"
    )


def test_the_bases_of_the_invalid_table_are_valid(k8s_api: Any, crds_installed: list[str], namespace: str) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi(k8s_api)
    for obj in (base_pool(), base_beat()):
        api.create_namespaced_custom_object(
            "celeryfleet.io", "v1alpha1", namespace, PLURALS[obj["kind"]], obj, dry_run="All", field_validation="Strict"
        )


# --- kubectl experience ------------------------------------------------------------------------


def test_printer_columns_and_the_celery_category(
    cluster: Cluster, crds_installed: list[str], unwatched_namespace: str
) -> None:
    for sample in ("pool-minimal.yaml", "beat.yaml"):
        cluster.kubectl("apply", "--server-side", "-n", unwatched_namespace, "-f", str(SAMPLES / sample))
    ready = {"type": "Ready", "status": "False", "reason": "Scaling", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    pool_status = {"status": {"replicas": 7, "desiredReplicas": 9, "queued": 42, "ready": "6/7", "conditions": [ready]}}
    beat_status = {
        "status": {
            "leader": "shop-beat-7d9f-abcde",
            "leaseTransitions": 3,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Leading", "lastTransitionTime": "2025-01-01T00:00:00Z"}
            ],
        }
    }
    for resource, patch in (("cwp/shop", pool_status), ("cbeat/shop", beat_status)):
        cluster.kubectl(
            "patch",
            resource,
            "-n",
            unwatched_namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(patch),
        )

    pools = cluster.kubectl("get", "cwp", "-n", unwatched_namespace).stdout.splitlines()
    # READY is the Ready condition; the pod counts have their own column.
    assert pools[0].split() == ["NAME", "READY", "PODS", "DESIRED", "QUEUED", "AGE"]
    assert pools[1].split()[:5] == ["shop", "False", "6/7", "9", "42"]
    beats = cluster.kubectl("get", "cbeat", "-n", unwatched_namespace).stdout.splitlines()
    assert beats[0].split() == ["NAME", "LEADER", "READY", "TRANSITIONS", "AGE"]
    assert beats[1].split()[:4] == ["shop", "shop-beat-7d9f-abcde", "True", "3"]
    assert "PAUSED" in cluster.kubectl("get", "cwp", "-n", unwatched_namespace, "-o", "wide").stdout

    listed = cluster.kubectl("get", "celery", "-n", unwatched_namespace, "-o", "name").stdout.split()
    assert sorted(listed) == ["celerybeat.celeryfleet.io/shop", "celeryworkerpool.celeryfleet.io/shop"]


def test_status_is_a_subresource(cluster: Cluster, crds_installed: list[str], unwatched_namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", unwatched_namespace, "-f", str(SAMPLES / "pool-minimal.yaml"))
    # A spec write cannot set status: only the status subresource can.
    cluster.kubectl("patch", "cwp/shop", "-n", unwatched_namespace, "--type=merge", "-p", '{"status": {"queued": 5}}')
    assert get_json(cluster, "cwp", "shop", "-n", unwatched_namespace).get("status", {}).get("queued") != 5


def _words(text: str) -> str:
    return " ".join(text.split())


def test_kubectl_explain_shows_every_autoscaling_field(cluster: Cluster, crds_installed: list[str]) -> None:
    schema = crdgen.generate_crds()[crdgen.POOL_FILE]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    autoscaling = schema["properties"]["spec"]["properties"]["tiers"]["items"]["properties"]["autoscaling"]

    def explained() -> str | None:
        proc = cluster.kubectl("explain", "celeryworkerpool.spec.tiers.autoscaling", check=False)
        return proc.stdout if proc.returncode == 0 and "targetDepthPerReplica" in proc.stdout else None

    # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    text = _words(wait_for(explained, timeout=60, interval=0.5, message="kubectl explain to know the CRD"))
    assert _words(autoscaling["description"]) in text
    for name, prop in autoscaling["properties"].items():
        assert name in text, name
        assert _words(prop["description"]) in text, f"{name}: description missing from kubectl explain"
