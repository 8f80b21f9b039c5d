"""The HPA model of the autoscaling benchmark, against the rules of the Kubernetes HPA controller.

Each case drives one `HorizontalPodAutoscaler` through syncs (time, metric value) and plays the
scale subresource: what a sync returns becomes spec.replicas (and status.replicas) for the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from bench._sim import HorizontalPodAutoscaler, HpaBehavior, HpaPolicy
from bench._sim.keda_hpa import HpaRules


@dataclass(frozen=True)
class Sync:
    at: float
    usage: float
    expect: int


def run(hpa: HorizontalPodAutoscaler, start: int, syncs: list[Sync]) -> None:
    replicas = start
    for s in syncs:
        got = hpa.reconcile(s.at, spec_replicas=replicas, status_replicas=replicas, usage=s.usage)
        assert got == s.expect, f"sync at t={s.at}: usage {s.usage} on {replicas} -> {got}, expected {s.expect}"
        replicas = got


def hpa(lo: int = 1, hi: int = 40, behavior: HpaBehavior | None = None) -> HorizontalPodAutoscaler:
    return HorizontalPodAutoscaler(min_replicas=lo, max_replicas=hi, target_average_value=10, behavior=behavior)


CASES = [
    pytest.param(1, 40, 10, [Sync(0, 109, 10)], id="tolerance-keeps-9pct-over"),
    pytest.param(1, 40, 10, [Sync(0, 91, 10)], id="tolerance-keeps-9pct-under"),
    pytest.param(1, 40, 10, [Sync(0, 112, 12)], id="beyond-tolerance-scales-to-ceil-usage-over-target"),
    pytest.param(1, 40, 10, [Sync(0, 200, 20)], id="average-value-target-is-per-replica"),
    pytest.param(1, 40, 2, [Sync(0, 1000, 4)], id="first-step-is-4-from-2"),
    pytest.param(
        1,
        40,
        2,
        [Sync(0, 1000, 4), Sync(15, 1000, 8), Sync(30, 1000, 16), Sync(45, 1000, 32), Sync(60, 1000, 40)],
        id="doubles-per-sync-up-to-max",
    ),
    pytest.param(
        1,
        40,
        20,
        [Sync(0, 200, 20), Sync(15, 0, 20), Sync(150, 0, 20), Sync(300, 0, 20), Sync(315, 0, 1)],
        id="holds-the-highest-recommendation-for-300s-then-drops-at-once",
    ),
    pytest.param(
        1,
        40,
        10,
        [Sync(0, 0, 10), Sync(15, 0, 10), Sync(299, 0, 10), Sync(301, 0, 1)],
        id="first-sync-records-the-current-count-as-a-recommendation",
    ),
    pytest.param(4, 40, 4, [Sync(0, 0, 4)], id="never-below-min-even-on-an-empty-list"),
    pytest.param(1, 4, 5, [Sync(0, 35, 4)], id="spec-above-max-goes-to-max"),
    pytest.param(2, 40, 1, [Sync(0, 0, 2)], id="spec-below-min-goes-to-min"),
    pytest.param(1, 40, 0, [Sync(0, 500, 0)], id="scaled-to-zero-means-hpa-disabled"),
]


@pytest.mark.parametrize(("lo", "hi", "start", "syncs"), CASES)
def test_hpa_without_behavior(lo: int, hi: int, start: int, syncs: list[Sync]) -> None:
    # KEDA leaves spec.behavior nil: the controller's built-in limits apply.
    run(hpa(lo=lo, hi=hi), start, syncs)


BEHAVIOR_CASES = [
    pytest.param(2, [Sync(0, 1000, 6)], id="max-of-4-pods-or-100pct-from-2-is-6"),
    pytest.param(1, [Sync(0, 1000, 5)], id="from-1-the-4-pod-policy-wins"),
    pytest.param(8, [Sync(0, 1000, 16)], id="from-8-the-100pct-policy-wins"),
    pytest.param(
        2,
        [Sync(0, 1000, 6), Sync(5, 1000, 6), Sync(10, 1000, 6), Sync(15.5, 1000, 12)],
        id="one-step-per-15s-period-counted-from-the-period-start",
    ),
    pytest.param(
        20,
        [Sync(0, 200, 20), Sync(15, 0, 20), Sync(299, 0, 20), Sync(300, 0, 1)],
        id="down-window-300s-then-100pct-per-15s-allows-all-at-once",
    ),
    pytest.param(10, [Sync(0, 109, 10)], id="tolerance-applies-on-the-behavior-path-too"),
]


@pytest.mark.parametrize(("start", "syncs"), BEHAVIOR_CASES)
def test_hpa_with_the_api_default_behavior(start: int, syncs: list[Sync]) -> None:
    run(hpa(behavior=HpaBehavior()), start, syncs)


def test_scale_down_policy_limits_the_step() -> None:
    behavior = HpaBehavior(scale_down=HpaRules(0, (HpaPolicy("Pods", 2, 60),)))
    run(hpa(behavior=behavior), 10, [Sync(0, 0, 8), Sync(15, 0, 8), Sync(61, 0, 6)])


def test_scale_up_stabilization_takes_the_lowest_recent_recommendation() -> None:
    behavior = HpaBehavior(scale_up=HpaRules(60, (HpaPolicy("Percent", 1000, 15),)))
    # The first sync records 2 (the current count) at t=0: for 60 s nothing higher can win.
    run(hpa(behavior=behavior), 2, [Sync(0, 100, 2), Sync(30, 100, 2), Sync(61, 100, 10)])


def test_metric_replicas_uses_status_replicas_for_the_tolerance() -> None:
    model = hpa()
    assert model.metric_replicas(usage=100, status_replicas=10) == 10
    assert model.metric_replicas(usage=100, status_replicas=8) == 10  # ratio 1.25: scale
    assert model.metric_replicas(usage=0, status_replicas=0) == 0


def test_rejects_a_zero_target() -> None:
    with pytest.raises(ValueError, match="target_average_value"):
        HorizontalPodAutoscaler(min_replicas=1, max_replicas=2, target_average_value=0)
