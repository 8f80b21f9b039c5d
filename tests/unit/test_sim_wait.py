"""The wait-target simulation: the oracle, CSV traces, replayed start-ups, the wait policy's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench._sim import (
    FleetParams,
    OperatorScaler,
    Task,
    Trace,
    drift,
    oracle,
    read_csv_startups,
    read_csv_trace,
    simulate,
    summarize,
    write_csv_trace,
)

from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier


def _trace(tasks: list[tuple[float, float]], horizon: float = 100.0) -> Trace:
    return Trace("t", "t", tuple(Task(i, a, 0, d) for i, (a, d) in enumerate(tasks)), horizon)


def test_oracle_uses_the_wait_budget_before_adding_a_pod() -> None:
    # One warm pod of 1 slot; two 5 s tasks at t=10: with a 6 s target the second waits 5 s on the warm pod.
    got = oracle(_trace([(10, 5), (10, 5)]), target=6, concurrency=1, min_pods=1, max_pods=3, startup=20)
    assert got.pods == 1 and got.max_wait == pytest.approx(5)
    assert got.worker_seconds == pytest.approx(100)  # the warm pod, the horizon long
    # A 2 s target cannot wait 5 s: a second pod, ready at 10 (created at -10: 20 s start-up + 5 s of work).
    tight = oracle(_trace([(10, 5), (10, 5)]), target=2, concurrency=1, min_pods=1, max_pods=3, startup=20)
    assert tight.pods == 2 and tight.max_wait == 0
    assert tight.worker_seconds == pytest.approx(100 + 20 + 5)


def test_oracle_restarts_a_pod_idle_longer_than_its_start_up() -> None:
    tasks = [(10, 5), (10, 5), (60, 5), (60, 5)]  # the extra pod idles 45 s > 20 s start-up: ends, restarts
    got = oracle(_trace(tasks), target=0, concurrency=1, min_pods=1, max_pods=2, startup=20)
    assert got.lives == 2
    assert got.worker_seconds == pytest.approx(100 + 2 * (20 + 5))
    kept = oracle(_trace(tasks), target=0, concurrency=1, min_pods=1, max_pods=2, startup=60)
    assert kept.lives == 1 and kept.worker_seconds == pytest.approx(100 + 60 + 55)  # idle 45 s < 60 s: kept


def test_oracle_at_max_pods_lets_tasks_wait_past_the_target() -> None:
    got = oracle(_trace([(0, 10)] * 3), target=1, concurrency=1, min_pods=1, max_pods=1, startup=5)
    assert got.max_wait == pytest.approx(20)


def test_csv_trace_and_startups_round_trip(tmp_path: Path) -> None:
    trace = drift(3, horizon=60.0)
    path = tmp_path / "t.csv"
    write_csv_trace(trace, path)
    back = read_csv_trace(path, horizon=60.0)
    assert [(t.arrival, t.priority) for t in back.tasks] == [(t.arrival, t.priority) for t in trace.tasks]
    assert [t.duration for t in back.tasks] == pytest.approx([t.duration for t in trace.tasks], abs=1e-6)
    starts = tmp_path / "s.csv"
    starts.write_text("startup\n12.5\n3\n")
    assert read_csv_startups(starts) == (12.5, 3.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("arrival,priority,duration\n1,12,3\n", "priority outside 0-9", id="priority"),
        pytest.param("arrival,priority,duration\n-1,0,3\n", "negative", id="negative"),
        pytest.param("arrival,priority\n1,0\n", "want arrival,priority,duration", id="column missing"),
    ],
)
def test_csv_trace_refuses_bad_rows(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_csv_trace(path)


def test_replayed_startups_are_used_in_order() -> None:
    one_each = Autoscaling(target_depth_per_replica=1)
    tier = Tier(name="q", queues=["q"], concurrency=1, replicas=ReplicaBounds(min=0, max=2), autoscaling=one_each)
    trace = _trace([(1.0, 30.0), (1.0, 30.0)], horizon=40)
    params = FleetParams.for_tier(tier, startup_times=(3.0, 7.0), dt=0.1)
    got = simulate(trace, OperatorScaler(tier, phase=1.0), params)
    assert sorted(got.starts) == pytest.approx([1.0 + 3.0, 1.0 + 7.0], abs=0.11)  # both created by the poll at 1 s


def test_wait_policy_in_the_simulator_meets_a_reachable_target_on_drift() -> None:
    # Steady Poisson load whose run times double at 300 s; a 5 s p95 target, 2-5 s start-ups.
    tier = Tier(
        name="d", queues=["d"], concurrency=4, replicas=ReplicaBounds(min=1, max=20),
        autoscaling=Autoscaling(target_wait_seconds=5),
    )  # fmt: skip
    trace = drift(1, rate=2.0, change_at=300.0, horizon=600.0)
    scaler = OperatorScaler(tier, wait_inputs=True)
    got = summarize([simulate(trace, scaler, FleetParams.for_tier(tier, startup_delay=(2.0, 5.0)), seed=1)])
    assert got.p95 <= 5.0
    assert any("workers for p95 <= 5s" in d.message for _, d in scaler.decisions)


def test_oracle_may_leave_the_percentile_out_late() -> None:
    # Twenty 5 s tasks at once on one warm 1-slot pod, a 1 s target: on time they need 19 more pods;
    # with 10 % allowed late, two wait on the warm pod instead.
    tasks = [(10.0, 5.0)] * 20
    strict = oracle(_trace(tasks), target=1, concurrency=1, min_pods=1, max_pods=40, startup=5)
    p90 = oracle(_trace(tasks), target=1, concurrency=1, min_pods=1, max_pods=40, startup=5, late_fraction=0.1)
    assert strict.pods == 20 and p90.pods == 18
    assert p90.worker_seconds < strict.worker_seconds
