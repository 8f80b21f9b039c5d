"""The API models: samples round-trip, defaults are the documented ones, bad specs name the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.api.models import (
    BEAT_KIND,
    POOL_KIND,
    WORKER_OPTION_ENV,
    WORKER_OPTIONS,
    Autoscaling,
    CeleryBeatSpec,
    CeleryBeatStatus,
    CeleryWorkerPoolSpec,
    CeleryWorkerPoolStatus,
    InvalidSpec,
    parse_beat,
    parse_pool,
)

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"


def sample_objects() -> list[Any]:
    objects = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") in (POOL_KIND, BEAT_KIND):
                objects.append(pytest.param(doc, id=f"{path.stem}[{index}]"))
    return objects


def parse(obj: dict[str, Any]) -> CeleryWorkerPoolSpec | CeleryBeatSpec:
    return parse_pool(obj) if obj["kind"] == POOL_KIND else parse_beat(obj)


def assert_contains(outer: Any, inner: Any, path: str = "spec") -> None:
    """Everything the user wrote survives a parse/dump cycle, spelled the same way."""
    if isinstance(inner, dict):
        assert isinstance(outer, dict), path
        for key, value in inner.items():
            assert key in outer, f"{path}.{key} was dropped"
            assert_contains(outer[key], value, f"{path}.{key}")
    elif isinstance(inner, list):
        assert isinstance(outer, list) and len(outer) == len(inner), path
        for i, (o, v) in enumerate(zip(outer, inner, strict=True)):
            assert_contains(o, v, f"{path}[{i}]")
    else:
        assert outer == inner, f"{path}: {outer!r} != {inner!r}"


def test_the_samples_cover_both_kinds() -> None:
    kinds = {p.values[0]["kind"] for p in sample_objects()}
    assert kinds == {POOL_KIND, BEAT_KIND}
    names = {p.stem for p in SAMPLES.glob("*.yaml")}
    assert {"pool-minimal", "pool-three-tiers", "beat"} <= names


@pytest.mark.parametrize("obj", sample_objects())
def test_samples_round_trip(obj: dict[str, Any]) -> None:
    spec = parse(obj)
    wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert_contains(wire, obj["spec"])
    assert type(spec).model_validate(wire) == spec


def test_minimal_pool_gets_the_three_default_tiers() -> None:
    spec = parse_pool({"app": "shop.celery:app", "image": "img:1", "broker": {"url": "redis://r:6379/0"}})
    got = [(t.name, t.queues, t.concurrency, t.replicas.min, t.replicas.max) for t in spec.tiers]
    assert got == [
        ("high", ["high_priority"], 4, 2, 8),
        ("medium", ["medium_priority", "celery"], 6, 4, 12),
        ("low", ["low_priority"], 2, 1, 4),
    ]
    for tier in spec.tiers:
        assert tier.pool == "prefork"
        assert tier.prefetch_multiplier == 1
        assert tier.log_level == "INFO"
        assert tier.autoscaling == Autoscaling()
        assert tier.pod_disruption_budget is None
    assert spec.max_total_replicas is None
    assert spec.paused is False
    assert spec.broker.priority_steps == [0, 3, 6, 9]
    assert spec.broker.global_keyprefix == ""


def test_default_tiers_are_fresh_objects_per_pool() -> None:
    spec = {"app": "a", "image": "i", "broker": {"url": "redis://r"}}
    first, second = parse_pool(spec), parse_pool(spec)
    first.tiers[0].replicas.max = 99
    assert second.tiers[0].replicas.max == 8


def test_autoscaling_defaults() -> None:
    assert Autoscaling().model_dump() == {
        "target_depth_per_replica": 10,
        "target_wait_seconds": None,
        "target_wait_percentile": 95,
        "activation_depth": 0,
        "count_in_flight": True,
        "scale_up_max_step": None,
        "scale_up_period_seconds": 15,
        "scale_down_stabilization_seconds": 30,
        "scale_down_max_step": None,
        "scale_down_max_percent": 100,
        "scale_down_period_seconds": 15,
        "cooldown_seconds": 120,
        "fallback_replicas": None,
        "scale_in_busy_workers": "Keep",
    }


def test_beat_defaults() -> None:
    spec = parse_beat({"app": "a", "image": "i", "broker": {"urlSecretRef": {"name": "s", "key": "url"}}})
    assert spec.scheduler is None  # the operator's LeaseScheduler (planning.beat_workload.DEFAULT_SCHEDULER)
    assert (spec.lease.duration_seconds, spec.lease.renew_deadline_seconds, spec.lease.retry_period_seconds) == (
        15,
        10,
        2,
    )
    assert spec.standby == 1
    assert spec.elector_image is None
    assert spec.paused is False


def test_wire_names_are_camel_case_with_kib_spelled_out() -> None:
    spec = parse_pool(
        {
            "app": "a",
            "image": "i",
            "broker": {"url": "redis://r"},
            "tiers": [
                {
                    "name": "t",
                    "queues": ["q"],
                    "concurrency": 1,
                    "maxMemoryPerChildKiB": 1000,
                    "replicas": {"min": 0, "max": 1},
                }
            ],
        }
    )
    assert spec.tiers[0].max_memory_per_child_kib == 1000
    wire = spec.model_dump(by_alias=True, exclude_none=True)
    assert wire["tiers"][0]["maxMemoryPerChildKiB"] == 1000
    assert "urlSecretRef" not in wire["broker"]
    assert {"imagePullSecrets", "envFrom", "podLabels", "topologySpreadConstraints"} <= wire.keys()


def test_parse_accepts_a_whole_object_or_its_spec() -> None:
    spec = {"app": "a", "image": "i", "broker": {"url": "redis://r"}}
    body = {"apiVersion": "celeryfleet.io/v1alpha1", "kind": POOL_KIND, "metadata": {"name": "x"}, "spec": spec}
    assert parse_pool(body) == parse_pool(spec)


def test_a_spec_that_is_not_an_object_is_reported() -> None:
    with pytest.raises(InvalidSpec, match=r"^spec: must be an object$"):
        parse_pool({"spec": ["not", "a", "map"]})


def test_every_problem_is_reported_not_only_the_first() -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_pool({"image": "", "broker": {"url": "http://r"}})
    assert caught.value.problems == [
        "spec.app: required field is missing",
        "spec.image: String should have at least 1 character",
        "spec.broker.url: must start with redis://, rediss:// or sentinel:// (every ';'-separated URL)",
    ]
    assert caught.value.message == "; ".join(caught.value.problems)


def test_status_models_tolerate_fields_written_by_others() -> None:
    status = CeleryWorkerPoolStatus.model_validate(
        {"replicas": 3, "ready": "2/3", "kopf": {"progress": {}}, "tiers": [{"name": "high", "queueDepth": 7}]}
    )
    assert status.tiers[0].queue_depth == 7
    assert status.model_dump(by_alias=True, exclude_none=True)["desiredReplicas"] == 0
    beat = CeleryBeatStatus.model_validate({"leader": "shop-beat-0", "leaseTransitions": 2})
    assert beat.lease_transitions == 2


# --- Invalid specs -----------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _pool() -> dict[str, Any]:
    return {
        "app": "shop.celery:app",
        "image": "ghcr.io/example/celery-app:1.0",
        "broker": {"url": "redis://redis.celery.svc:6379/0"},
        "tiers": [
            {"name": "high", "queues": ["high_priority"], "concurrency": 4, "replicas": {"min": 2, "max": 8}},
            {"name": "low", "queues": ["low_priority"], "concurrency": 2, "replicas": {"min": 1, "max": 4}},
        ],
    }


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets a dotted path (list indices as numbers) of the spec."""

    def mutate(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(spec: dict[str, Any]) -> None:
        for m in mutations:
            m(spec)

    return mutate


INVALID_POOLS = [
    pytest.param(_delete("app"), "spec.app: required field is missing", id="app-missing"),
    pytest.param(_set("image", ""), "spec.image: String should have at least 1", id="image-empty"),
    pytest.param(_set("broker", {}), "spec.broker: set exactly one of url or urlSecretRef", id="broker-neither"),
    pytest.param(
        _set("broker.urlSecretRef", {"name": "s", "key": "url"}),
        "spec.broker: set exactly one of url or urlSecretRef",
        id="broker-both",
    ),
    pytest.param(
        _set("broker.url", "amqp://rabbit:5672//"),
        "spec.broker.url: must start with redis://, rediss:// or sentinel:// (every ';'-separated URL)",
        id="url-scheme",
    ),
    pytest.param(
        _set("broker.url", "redis://:hunter2@redis:6379/0"),
        "spec.broker.url: must not contain a password",
        id="url-password-only",
    ),
    pytest.param(
        _set("broker.url", "rediss://app:hunter2@redis:6380/0"),
        "spec.broker.url: must not contain a password",
        id="url-user-and-password",
    ),
    pytest.param(
        _set("broker.url", "redis://redis:6379/0?password=hunter2"),
        "spec.broker.url: must not contain a password",
        id="url-password-query",
    ),
    pytest.param(
        _set("broker.url", "redis://r1:6379/0;redis://:s3cret@r2:6379/0"),
        "spec.broker.url: must not contain a password (in any ';'-separated URL)",
        id="url-password-behind-failover",
    ),
    pytest.param(
        _set("broker.url", "redis://r1:6379/0;amqp://r2"),
        "spec.broker.url: must start with redis://, rediss:// or sentinel://",
        id="url-failover-scheme",
    ),
    pytest.param(
        _set("broker.url", "redis://r1:6379/0;sentinel://s1:26379"),
        "spec.broker.url: do not mix sentinel://",
        id="url-mixed-kinds",
    ),
    pytest.param(
        _set("broker.url", "redis://shown:6379/0?host=elsewhere"),
        "spec.broker.url: the only query option supported in a broker URL is ssl_cert_reqs=required",
        id="url-host-in-query",
    ),
    pytest.param(
        _set("broker.url", "rediss://r:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/var/run/secrets/token"),
        "spec.broker.url: the only query option supported in a broker URL is ssl_cert_reqs=required",
        id="url-file-in-query",
    ),
    pytest.param(
        _set("broker.url", "redis://r:6379/0?socket_timeout=999"),
        "spec.broker.url: the only query option supported in a broker URL is ssl_cert_reqs=required",
        id="url-timeout-in-query",
    ),
    pytest.param(
        _set("broker.prioritySteps", [0, 6, 3]),
        "spec.broker.prioritySteps: must be strictly increasing",
        id="priority-steps-order",
    ),
    pytest.param(
        _set("broker.prioritySteps", [0, 10]),
        "spec.broker.prioritySteps[1]: Input should be less than or equal to 9",
        id="priority-step-range",
    ),
    pytest.param(
        _set("tiers.0.replicas", {"min": 5, "max": 3}),
        "spec.tiers[0].replicas.min: min must be <= max (got 5 and 3)",
        id="replicas-min-over-max",
    ),
    pytest.param(
        _set("tiers.1.name", "high"),
        "spec.tiers: tier names must be unique (got high more than once)",
        id="tier-names-unique",
    ),
    pytest.param(
        _set("tiers.1.queues", ["low_priority", "high_priority"]),
        "spec.tiers: a queue may belong to at most one tier (got 'high_priority' in tiers 'high' and 'low')",
        id="queue-in-two-tiers",
    ),
    pytest.param(
        _set("tiers.0.queues", ["a", "a"]), "spec.tiers[0].queues: must not list a queue twice", id="queue-twice"
    ),
    pytest.param(_set("tiers.0.queues", []), "spec.tiers[0].queues: List should have at least 1", id="no-queues"),
    pytest.param(
        _set("tiers.0.queues", ["a,b"]),
        "spec.tiers[0].queues[0]: queue names must not contain commas or whitespace",
        id="queue-comma",
    ),
    pytest.param(_set("tiers.0.name", "High_Tier"), "spec.tiers[0].name: must be a DNS label", id="tier-name-dns"),
    pytest.param(
        _set("tiers.0.concurrency", 0),
        "spec.tiers[0].concurrency: Input should be greater than or equal to 1",
        id="concurrency-zero",
    ),
    pytest.param(
        _set("tiers.0.pool", "multiprocessing"), "spec.tiers[0].pool: Input should be 'prefork'", id="pool-enum"
    ),
    pytest.param(
        _set("tiers.0.autoscaling", {"targetDepthPerReplica": 0}),
        "spec.tiers[0].autoscaling.targetDepthPerReplica: Input should be greater than or equal to 1",
        id="target-zero",
    ),
    pytest.param(
        _all(_set("tiers.0.softTimeLimitSeconds", 60), _set("tiers.0.timeLimitSeconds", 60)),
        "spec.tiers[0].softTimeLimitSeconds: softTimeLimitSeconds must be < timeLimitSeconds (got 60 and 60)",
        id="soft-not-below-hard",
    ),
    pytest.param(
        _all(_set("tiers.0.timeLimitSeconds", 300), _set("tiers.0.terminationGracePeriodSeconds", 30)),
        "spec.tiers[0].terminationGracePeriodSeconds: terminationGracePeriodSeconds must be >= "
        "timeLimitSeconds so scale-in never cuts a running task short (got 30 and 300)",
        id="grace-below-time-limit",
    ),
    pytest.param(
        _set("tiers.0.autoscaling", {"fallbackReplicas": 20}),
        "spec.tiers[0].autoscaling.fallbackReplicas: fallbackReplicas must lie within "
        "replicas.min..replicas.max (got 20, bounds 2..8)",
        id="fallback-out-of-bounds",
    ),
    pytest.param(
        _set("tiers.0.podDisruptionBudget", {"maxUnavailable": 1, "minAvailable": 1}),
        "spec.tiers[0].podDisruptionBudget: set at most one of maxUnavailable or minAvailable",
        id="pdb-both",
    ),
    pytest.param(
        _set("tiers.0.podDisruptionBudget", {"maxUnavailable": "half"}),
        "spec.tiers[0].podDisruptionBudget.maxUnavailable: must be a non-negative integer or a percentage",
        id="pdb-not-percent",
    ),
    pytest.param(
        _set("maxTotalReplicas", 2),
        "spec.maxTotalReplicas: maxTotalReplicas must be >= the sum of the tiers' replicas.min (got 2, sum 3)",
        id="budget-below-minimums",
    ),
    pytest.param(_set("tiers", []), "spec.tiers: List should have at least 1", id="tiers-empty"),
    pytest.param(_set("tiers.0.replicaz", {"min": 1}), "spec.tiers[0].replicaz: unknown field", id="unknown-field"),
    pytest.param(
        _set("imagePullPolicy", "Sometimes"), "spec.imagePullPolicy: Input should be 'Always'", id="pull-policy"
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), INVALID_POOLS)
def test_invalid_pools_are_rejected_naming_the_field(mutate: Mutation, expected: str) -> None:
    spec = _pool()
    parse_pool(spec)  # the base is valid, so the mutation is what fails
    bad = copy.deepcopy(spec)
    mutate(bad)
    with pytest.raises(InvalidSpec) as caught:
        parse_pool(bad)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


# Every spelling Click accepts of the options the operator sets (`-c 4`, `-c4`, `-Ec4`, `--concurrency=4`).
REFUSED_EXTRA_ARGS = [
    pytest.param(["-n", "worker@%h"], "-n/--hostname", id="hostname-short"),
    pytest.param(["--hostname", "worker@%h"], "-n/--hostname", id="hostname-long"),
    pytest.param(["--hostname=worker@%h"], "-n/--hostname", id="hostname-equals"),
    pytest.param(["-nworker@%h"], "-n/--hostname", id="hostname-attached"),
    pytest.param(["-Q", "celery"], "-Q/--queues", id="queues-short"),
    pytest.param(["--queues=a,b"], "-Q/--queues", id="queues-equals"),
    pytest.param(["-X", "low"], "-X/--exclude-queues", id="exclude-short"),
    pytest.param(["--exclude-queues", "low"], "-X/--exclude-queues", id="exclude-long"),
    pytest.param(["-P", "threads"], "-P/--pool", id="pool-short"),
    pytest.param(["--pool=gevent"], "-P/--pool", id="pool-equals"),
    pytest.param(["-c", "8"], "-c/--concurrency", id="concurrency-short"),
    pytest.param(["-c8"], "-c/--concurrency", id="concurrency-attached"),
    pytest.param(["-Ec8"], "-c/--concurrency", id="concurrency-after-a-flag"),
    pytest.param(["-BEDc", "8"], "-c/--concurrency", id="concurrency-after-flags"),
    pytest.param(["--concurrency", "8"], "-c/--concurrency", id="concurrency-long"),
    pytest.param(["--prefetch-multiplier=4"], "--prefetch-multiplier", id="prefetch-equals"),
    pytest.param(["--prefetch-multiplier", "4"], "--prefetch-multiplier", id="prefetch-long"),
    pytest.param(["--disable-prefetch"], "--disable-prefetch", id="disable-prefetch"),
    pytest.param(["--autoscale=10,3"], "--autoscale", id="autoscale"),
]


@pytest.mark.parametrize(("args", "option"), REFUSED_EXTRA_ARGS)
def test_extra_args_that_override_the_model_are_refused_naming_the_field_to_use(args: list[str], option: str) -> None:
    spec = _pool()
    spec["tiers"][1]["extraArgs"] = ["--max-tasks-per-child", "10", *args]
    with pytest.raises(InvalidSpec) as caught:
        parse_pool(spec)
    (problem,) = caught.value.problems
    assert problem.startswith(f"spec.tiers[1].extraArgs[2]: {option} is set by the operator: "), problem
    fix = next(fix for short, long, fix in WORKER_OPTIONS if option.endswith(f"--{long}"))
    assert problem.endswith(fix)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-O", "fair", "-l", "INFO"], id="other-short-options"),
        pytest.param(["-lwarning"], id="attached-value-with-an-n"),
        pytest.param(["-Ofair"], id="attached-value"),
        pytest.param(["--hostnames"], id="longer-long-name"),
        pytest.param(["--max-tasks-per-child=10", "--without-mingle"], id="long-options"),
        pytest.param(["-E"], id="a-flag-alone"),
        pytest.param(["--", "worker_max_tasks_per_child=100"], id="settings"),
    ],
)
def test_extra_args_the_model_does_not_depend_on_are_accepted(args: list[str]) -> None:
    spec = _pool()
    spec["tiers"][0]["extraArgs"] = args
    assert parse_pool(spec).tiers[0].extra_args == args


@pytest.mark.parametrize("name", sorted(WORKER_OPTION_ENV))
def test_worker_options_in_env_are_refused(name: str) -> None:
    spec = _pool()
    spec["env"] = [{"name": "OTHER", "value": "1"}, {"name": name, "value": "x"}]
    with pytest.raises(InvalidSpec) as caught:
        parse_pool(spec)
    assert caught.value.problems == [
        "spec.env[1].name: sets a `celery worker` option the operator owns (Click reads CELERY_WORKER_<OPTION>); "
        f"remove it ({WORKER_OPTION_ENV[name]})"
    ]


def test_beat_extra_args_are_not_worker_options() -> None:
    assert parse_beat({**_beat(), "extraArgs": ["-n", "x", "--pidfile="]}).extra_args == ["-n", "x", "--pidfile="]


def test_disable_prefetch_is_on_by_default() -> None:
    assert all(t.disable_prefetch for t in parse_pool(_pool()).tiers)


def _beat() -> dict[str, Any]:
    return {"app": "a", "image": "i", "broker": {"url": "redis://r:6379/0"}}


INVALID_BEATS = [
    pytest.param(_set("standby", 2), "spec.standby: Input should be less than or equal to 1", id="standby-two"),
    pytest.param(
        _set("lease", {"durationSeconds": 10, "renewDeadlineSeconds": 10}),
        "spec.lease.renewDeadlineSeconds: renewDeadlineSeconds must be < durationSeconds (got 10 and 10)",
        id="renew-not-below-duration",
    ),
    pytest.param(
        _set("lease", {"retryPeriodSeconds": 10}),
        "spec.lease.retryPeriodSeconds: retryPeriodSeconds must be < renewDeadlineSeconds (got 10 and 10)",
        id="retry-not-below-renew",
    ),
    pytest.param(_set("scheduler", ""), "spec.scheduler: String should have at least 1", id="scheduler-empty"),
    pytest.param(_set("extraArgs", ["x" * 600]), "spec.extraArgs[0]: String should have at most 512", id="arg-long"),
]


@pytest.mark.parametrize(("mutate", "expected"), INVALID_BEATS)
def test_invalid_beats_are_rejected_naming_the_field(mutate: Mutation, expected: str) -> None:
    spec = _beat()
    parse_beat(spec)
    mutate(spec)
    with pytest.raises(InvalidSpec) as caught:
        parse_beat(spec)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://redis.celery.svc:6379/0", id="plain"),
        pytest.param("rediss://redis:6380/0?ssl_cert_reqs=required", id="tls-with-query"),
        pytest.param("redis://default@redis:6379/0", id="user-without-password"),
        pytest.param("redis://[::1]:6379/0", id="ipv6"),
    ],
)
def test_broker_urls_without_passwords_are_accepted(url: str) -> None:
    assert parse_pool({"app": "a", "image": "i", "broker": {"url": url}}).broker.url == url


def test_the_error_never_echoes_the_password() -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_pool({"app": "a", "image": "i", "broker": {"url": "redis://:hunter2@r:6379/0"}})
    assert "hunter2" not in str(caught.value)
