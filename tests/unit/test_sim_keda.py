"""The KEDA Redis Lists model of the benchmark: one list only, polling, activation, cached metrics."""

from __future__ import annotations

import dataclasses

import pytest
from bench._sim import (
    FleetView,
    KedaHpaConfig,
    KedaHpaScaler,
    KedaRedisListsTrigger,
    OperatorScaler,
    list_key,
)

from celery_fleet.api.models import ReplicaBounds, Tier

Q = "high_priority"


def view(spec: int, **lengths: int) -> FleetView:
    """lengths by step name: s0 (the bare list), s3, s6, s9."""
    lists = {list_key(Q, int(k[1:])): n for k, n in lengths.items()}
    return FleetView(list_lengths=lists, in_flight=0, spec_replicas=spec, status_replicas=spec, ready_replicas=spec)


def keda(lo: int = 2, hi: int = 8, **overrides: object) -> KedaHpaScaler:
    config = KedaHpaConfig(trigger=KedaRedisListsTrigger(Q, list_length=10), min_replica_count=lo, max_replica_count=hi)
    return KedaHpaScaler(dataclasses.replace(config, **overrides))  # type: ignore[arg-type]


def test_list_keys_follow_kombu() -> None:
    assert list_key(Q, 0) == "high_priority"
    assert list_key(Q, 3) == "high_priority\x06\x163"
    assert list_key(Q, 9) == "high_priority\x06\x169"


@pytest.mark.parametrize(
    ("lengths", "keda_sees", "operator_sees"),
    [
        pytest.param({"s0": 50}, 50, 50, id="priority-0-only-both-see-it"),
        pytest.param({"s3": 40, "s6": 30, "s9": 10}, 0, 80, id="prioritised-only-keda-sees-nothing"),
        pytest.param({"s0": 5, "s3": 40, "s9": 35}, 5, 80, id="mixed-keda-sees-the-bare-list-only"),
    ],
)
def test_keda_reading_misses_priority_sub_lists(lengths: dict[str, int], keda_sees: int, operator_sees: int) -> None:
    v = view(2, **lengths)
    value, active = KedaRedisListsTrigger(Q, list_length=10).read(v.list_lengths)
    assert (value, active) == (keda_sees, keda_sees > 0)
    assert sum(v.list_lengths.values()) == operator_sees


def test_a_prioritised_backlog_scales_ours_but_not_keda() -> None:
    tier = Tier(name="high", queues=[Q], concurrency=4, replicas=ReplicaBounds(min=2, max=8))
    backlog = view(2, s3=40, s6=40)
    ours = OperatorScaler(tier)
    assert ours.tick(0.0, backlog) == 8
    theirs = keda()
    assert [theirs.tick(t, backlog) for t in (0.0, 15.0, 30.0, 45.0)] == [None, None, None, None]


def test_the_hpa_acts_only_on_its_15s_sync() -> None:
    k = keda(hpa_phase=5.0, keda_phase=100.0)
    assert k.due() == 5.0
    assert k.tick(5.0, view(2, s0=80)) == 4  # max(2 x 2, 4)
    assert k.due() == 20.0
    assert k.tick(20.0, view(4, s0=80)) == 8


def test_activation_from_zero_waits_for_the_30s_poll() -> None:
    k = keda(lo=0, hpa_phase=0.0, keda_phase=0.0)
    assert k.tick(0.0, view(0)) is None  # empty: stays at 0 (HPA disabled at 0)
    # A message lands at t=1: the HPA syncs at 15 but is disabled at 0 replicas; KEDA's poll at 30 activates.
    assert k.tick(15.0, view(0, s0=1)) is None
    assert k.tick(30.0, view(0, s0=1)) == 1


def test_activation_needs_more_than_activation_list_length() -> None:
    k = keda(lo=0, trigger=KedaRedisListsTrigger(Q, list_length=10, activation_list_length=5))
    assert k.tick(0.0, view(0, s0=5)) is None
    assert keda(lo=0).tick(0.0, view(0, s0=1)) == 1


def test_scale_to_zero_after_the_cooldown_period() -> None:
    k = keda(lo=0, hpa_phase=1000.0)  # the HPA out of the way
    assert k.tick(0.0, view(3, s0=7)) is None  # active: LastActiveTime = 0
    assert k.tick(30.0, view(3)) is None
    assert k.tick(300.0, view(3)) is None  # 300 s is not past the cooldown yet
    assert k.tick(330.0, view(3)) == 0


def test_cached_metrics_give_the_hpa_the_last_poll_value() -> None:
    fresh = keda(keda_phase=0.0, hpa_phase=15.0)
    cached = keda(keda_phase=0.0, hpa_phase=15.0, use_cached_metrics=True)
    for k in (fresh, cached):
        assert k.tick(0.0, view(2)) is None  # KEDA polls an empty list
    # A burst lands before the HPA sync at 15: only the fresh read sees it.
    assert fresh.tick(15.0, view(2, s0=200)) == 4
    assert cached.tick(15.0, view(2, s0=200)) is None
