"""metrics.SeriesBudget: per-pool series are capped per pool and per namespace, what is left out is
counted once per series, a pool is warned about once, and forgetting a pool gives its budget back."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from celery_fleet import metrics
from celery_fleet.handlers.autoscaler.signals import PoolSeries
from celery_fleet.metrics import OwnedGauge, SeriesBudget


def gauges(budget: SeriesBudget) -> tuple[OwnedGauge, OwnedGauge, CollectorRegistry]:
    registry = CollectorRegistry()
    depth = OwnedGauge("depth", "d", ["namespace", "pool", "tier", "queue_name"], registry, budget=budget, capped=True)
    desired = OwnedGauge("desired", "d", ["namespace", "pool", "tier"], registry, budget=budget)
    return depth, desired, registry


def test_the_pool_cap_refuses_new_queue_series_and_counts_each_once() -> None:
    budget = SeriesBudget(per_pool=3, per_namespace=100)
    dropped: list[str] = []
    budget.on_drop = dropped.append
    depth, desired, registry = gauges(budget)
    kept = [depth.set(("ns", "p", "high", f"q{i}"), i) for i in range(5)]
    assert kept == [True, True, True, False, False]
    assert depth.set(("ns", "p", "high", "q4"), 9) is False  # asked again every poll: counted once
    assert dropped == ["ns", "ns"] and budget.left_out(("ns", "p")) == 2
    assert depth.set(("ns", "p", "high", "q0"), 7) is True  # an existing series still moves
    assert desired.set(("ns", "p", "high"), 2) is True  # tier series are not refused by the pool cap
    assert budget.held(("ns", "p")) == 4 and budget.held(("ns", "p"), capped=True) == 3
    assert depth.set(("ns", "other", "high", "q0"), 1) is True  # another pool has its own budget
    text = generate_latest(registry).decode()
    assert text.count("depth{") == 4 and 'queue_name="q4"' not in text


def test_the_namespace_cap_bounds_many_small_pools_and_every_gauge() -> None:
    budget = SeriesBudget(per_pool=100, per_namespace=4)
    depth, desired, _ = gauges(budget)
    for i in range(4):
        assert desired.set(("ns", f"p{i}", "t"), 1)
    assert not desired.set(("ns", "p9", "t"), 1) and not depth.set(("ns", "p9", "t", "q"), 1)
    assert desired.set(("other", "p9", "t"), 1)  # another namespace


def test_forgetting_a_pool_gives_its_budget_back() -> None:
    budget = SeriesBudget(per_pool=2, per_namespace=4)
    depth, desired, _ = gauges(budget)
    assert desired.set(("ns", "p", "t"), 1)  # a tier series first: it takes no room under the pool's cap
    assert depth.set(("ns", "p", "t", "a"), 1) and depth.set(("ns", "p", "t", "b"), 1)
    assert not depth.set(("ns", "p", "t", "c"), 1)
    depth.remove_by_labels({"namespace": "ns", "pool": "p", "tier": "t", "queue_name": "a"})
    assert budget.held(("ns", "p"), capped=True) == 1
    assert depth.set(("ns", "p", "t", "c"), 1)  # freed by the removed queue
    depth.remove_by_labels({"namespace": "ns", "pool": "p"})
    desired.remove_by_labels({"namespace": "ns", "pool": "p"})
    assert budget.held(("ns", "p")) == 0 and budget.left_out(("ns", "p")) == 0
    assert desired.set(("ns", "q", "t"), 1)


def test_no_cap_when_zero() -> None:
    budget = SeriesBudget(0, 0)
    depth, _, _ = gauges(budget)
    assert all(depth.set(("ns", "p", "t", f"q{i}"), 1) for i in range(1000))


def test_pool_series_warn_once_per_pool_and_count_in_the_registry(caplog: pytest.LogCaptureFixture) -> None:
    before = (metrics.SERIES_BUDGET.per_pool, metrics.SERIES_BUDGET.per_namespace)
    metrics.SERIES_BUDGET.configure(2, 1000)
    series = PoolSeries()
    key = ("budget-ns", "wide")
    try:
        with caplog.at_level(logging.WARNING):
            for _poll in range(3):
                for q in range(5):
                    series.set(metrics.IN_FLIGHT, (*key, "t", f"q{q}"), 1)
        warnings = [r for r in caplog.records if "metric series left out" in r.getMessage()]
        assert len(warnings) == 1 and "budget-ns/wide" in warnings[0].getMessage()
        scraped = generate_latest(metrics.REGISTRY).decode()
        assert 'celery_fleet_metric_series_dropped_total{namespace="budget-ns"} 3.0' in scraped
        series.forget(key)
        assert metrics.SERIES_BUDGET.held(key) == 0
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for q in range(3):
                series.set(metrics.IN_FLIGHT, (*key, "t", f"q{q}"), 1)
        assert any("metric series left out" in r.getMessage() for r in caplog.records)  # a new pool: told again
    finally:
        series.forget(key)
        metrics.SERIES_BUDGET.configure(*before)
