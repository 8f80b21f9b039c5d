"""Pure status planning: drift detection, conditions, pool and beat status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from celery_fleet.api.models import CeleryBeatStatus, CeleryWorkerPoolStatus
from celery_fleet.planning.beat_status import BeatStatusInput, LeaseView, beat_status, current_leader, view_lease
from celery_fleet.planning.conditions import STALLED_REASONS, ConditionUpdate, conditions_equal, merge_conditions
from celery_fleet.planning.drift import drifted_fields, has_drifted
from celery_fleet.planning.pool_status import (
    PoolStatusInput,
    Problem,
    TierObservation,
    TierScaling,
    observe_deployment,
    pool_status,
)

DESIRED: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "p-high", "labels": {"a": "1"}},
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {"containers": [{"name": "w", "args": ["-Q", "q"], "resources": {"limits": {"cpu": "0.5"}}}]}
        },
    },
}


def _observed(**changes: Any) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "metadata": {"name": "p-high", "labels": {"a": "1", "added-by-someone": "x"}, "uid": "u", "generation": 3},
        "spec": {
            "replicas": 2,
            "strategy": {"type": "RollingUpdate"},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "w",
                            "args": ["-Q", "q"],
                            "imagePullPolicy": "Always",
                            "resources": {"limits": {"cpu": "500m"}},
                        }
                    ]
                }
            },
        },
        "status": {"replicas": 2},
    }
    for path, value in changes.items():
        node = obs
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    return obs


@pytest.mark.parametrize(
    ("observed", "drifted"),
    [
        pytest.param(_observed(), False, id="defaults-and-extra-fields-are-not-drift"),
        pytest.param(None, True, id="missing-object"),
        pytest.param(_observed(spec__replicas=5), True, id="replicas-changed"),
        pytest.param(_observed(metadata__labels={"a": "2"}), True, id="label-changed"),
        pytest.param(
            _observed(spec__template__spec__containers=[{"name": "w", "args": ["hacked"]}]), True, id="args-edited"
        ),
        pytest.param(
            _observed(spec__template__spec__containers=[{"name": "w", "args": ["-Q", "q"]}, {"name": "sidecar"}]),
            True,
            id="container-added",
        ),
    ],
)
def test_drift(observed: dict[str, Any] | None, drifted: bool) -> None:
    assert has_drifted(DESIRED, observed) is drifted


def test_drift_ignores_normalised_quantities_and_int_or_string() -> None:
    assert drifted_fields({"a": 1, "resources": {"cpu": "0.5"}}, {"a": "1", "resources": {"cpu": "500m"}}) == []
    assert drifted_fields({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == [".a.b[1]"]


NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:01:00Z"


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = merge_conditions(None, [ConditionUpdate("Ready", "False", "RollingOut", "x")], generation=1, now=NOW)
    same = merge_conditions(first, [ConditionUpdate("Ready", "False", "RollingOut", "y")], generation=2, now=LATER)
    flipped = merge_conditions(same, [ConditionUpdate("Ready", "True", "AllTiersReady", "z")], generation=2, now=LATER)
    assert same[0]["lastTransitionTime"] == NOW and same[0]["message"] == "y" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == LATER
    assert not conditions_equal(first, same) and conditions_equal(same, [dict(c) for c in same])


def _tier(name: str, spec: int, ready: int, *, gen: int = 1, seen: int = 1) -> TierObservation:
    return TierObservation(name, True, spec, spec, ready, spec, ready, seen, gen)


@pytest.mark.parametrize(
    ("tiers", "problem", "ready", "reason"),
    [
        pytest.param([_tier("high", 2, 2), _tier("low", 1, 1)], None, "True", "AllTiersReady", id="all-ready"),
        pytest.param([_tier("high", 2, 1)], None, "False", "RollingOut", id="waiting-for-pods"),
        pytest.param([_tier("high", 2, 2, gen=2, seen=1)], None, "False", "RollingOut", id="controller-behind"),
        pytest.param([TierObservation("high", False)], None, "False", "RollingOut", id="not-created-yet"),
        pytest.param(
            [], Problem("BrokerSecretMissing", "spec.broker..."), "False", "BrokerSecretMissing", id="problem-degrades"
        ),
    ],
)
def test_pool_status(tiers: list[TierObservation], problem: Problem | None, ready: str, reason: str) -> None:
    body, updates = pool_status(PoolStatusInput(generation=4, tiers=tiers, problem=problem))
    by_type = {u.type: u for u in updates}
    assert by_type["Ready"].status == ready and by_type["Ready"].reason == reason
    assert by_type["Degraded"].status == ("True" if problem else "False")
    assert body["observedGeneration"] == 4


def _health(updates: list[ConditionUpdate]) -> tuple[str, ...]:
    by_type = {u.type: u.status for u in updates}
    return tuple(by_type[t] for t in ("Ready", "Reconciling", "Stalled", "Degraded"))


# (Ready, Reconciling, Stalled, Degraded): kstatus reads Reconciling=True as InProgress, Stalled=True as Failed.
CURRENT, IN_PROGRESS = ("True", "False", "False", "False"), ("False", "True", "False", "False")


@pytest.mark.parametrize(
    ("inp", "health"),
    [
        pytest.param(PoolStatusInput(1, [_tier("high", 2, 2)]), CURRENT, id="ready"),
        pytest.param(PoolStatusInput(1, [_tier("high", 2, 2)], paused=True), CURRENT, id="paused"),
        pytest.param(PoolStatusInput(1, [TierObservation("high", False)]), IN_PROGRESS, id="creating"),
        pytest.param(PoolStatusInput(1, [_tier("high", 2, 1)]), IN_PROGRESS, id="rolling-out"),
        *(
            pytest.param(PoolStatusInput(1, [], problem=Problem(r, "fix it")), ("False", "False", "True", "True"), id=r)
            for r in sorted(STALLED_REASONS)
        ),
        pytest.param(
            PoolStatusInput(1, [], problem=Problem("SomethingTransient", "retrying")),
            ("False", "True", "False", "True"),
            id="unknown-reason-is-not-stalled",
        ),
    ],
)
def test_pool_health_conditions(inp: PoolStatusInput, health: tuple[str, ...]) -> None:
    _, updates = pool_status(inp)
    assert _health(updates) == health
    stalled = next(u for u in updates if u.type == "Stalled")
    if stalled.status == "True":
        assert inp.problem is not None
        assert (stalled.reason, stalled.message) == (inp.problem.reason, inp.problem.message)


def test_retired_conditions_are_dropped_and_order_is_stable() -> None:
    old = [{"type": "Progressing", "status": "True"}, {"type": "BrokerReachable", "status": "True"}]
    merged = merge_conditions(old, pool_status(PoolStatusInput(1, [_tier("high", 1, 1)]))[1], generation=1, now=NOW)
    assert [c["type"] for c in merged] == ["Ready", "Reconciling", "Stalled", "Degraded", "BrokerReachable"]
    assert all(c.get("observedGeneration") == 1 for c in merged[:4])


def test_observe_deployment_reads_status() -> None:
    dep = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 3},
        "status": {"replicas": 3, "readyReplicas": 2, "observedGeneration": 2},
    }
    t = observe_deployment("high", dep)
    assert (t.spec_replicas, t.ready_replicas, t.generation, t.observed_generation) == (3, 2, 2, 2)
    assert observe_deployment("low", None).exists is False


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("lease", "now", "leader"),
    [
        pytest.param(LeaseView("pod-a", 1, T0, 15), T0 + dt.timedelta(seconds=10), "pod-a", id="fresh"),
        pytest.param(LeaseView("pod-a", 1, T0, 15), T0 + dt.timedelta(seconds=16), None, id="expired"),
        pytest.param(LeaseView(None, 1, T0, 15), T0, None, id="released"),
        pytest.param(LeaseView("pod-a", 1, None, 15), T0, None, id="never-renewed"),
    ],
)
def test_current_leader(lease: LeaseView, now: dt.datetime, leader: str | None) -> None:
    assert current_leader(lease, now) == leader


def test_beat_degraded_only_after_a_lease_duration_without_leader() -> None:
    lease = view_lease({"spec": {"leaseTransitions": 2}}, 15)
    early = BeatStatusInput(1, lease, T0 + dt.timedelta(seconds=5), T0, 15, True)
    late = BeatStatusInput(1, lease, T0 + dt.timedelta(seconds=20), T0, 15, True)
    assert {u.type: u.status for u in beat_status(early)[1]}["Degraded"] == "False"
    body, updates = beat_status(late)
    assert {u.type: (u.status, u.reason) for u in updates}["Degraded"] == ("True", "NoLeader")
    # Leaderless is never Current; not Stalled either: a standby or a restarted pod may still lead.
    assert _health(beat_status(early)[1]) == IN_PROGRESS
    assert _health(updates) == ("False", "True", "False", "True")
    assert body["leader"] == "" and body["leaseTransitions"] == 2


def test_status_bodies_are_the_status_models_as_written() -> None:
    """One shape: what the reconcilers write is the status model's JSON, nothing beside it."""
    scaling = {"high": TierScaling(desired_replicas=3, queue_depth=40, in_flight=2, scheduled=1, busy_workers=0)}
    pool, _ = pool_status(PoolStatusInput(2, [_tier("high", 2, 1), _tier("low", 1, 1)], scaling))
    assert CeleryWorkerPoolStatus.model_validate(pool).to_json() == pool
    assert "queueDepth" not in pool["tiers"][1]  # never read: left out, not written as 0
    lease = LeaseView("p1", 2, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), 15)
    beat, _ = beat_status(BeatStatusInput(2, lease, dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC), None, 15, True))
    assert CeleryBeatStatus.model_validate(beat).to_json() == beat
    assert beat["renewTime"] == "2026-01-01T00:00:00.000000Z"
