"""The benchmark's simulator: Redis priority lists, workers, start-up, warm shutdown, scale-in, cost."""

from __future__ import annotations

import dataclasses
import math

import pytest
from bench._sim import (
    FleetParams,
    FleetView,
    KedaHpaConfig,
    KedaHpaScaler,
    KedaRedisListsTrigger,
    OperatorScaler,
    SimResult,
    StaticFleet,
    Task,
    Trace,
    diurnal,
    percentile,
    poisson_bursts,
    priority_step,
    simulate,
    step_burst,
)

from celery_fleet.api.models import ReplicaBounds, Tier

Q = "q"


class Scripted:
    """Writes the given replica counts at the given times."""

    name = "scripted"

    def __init__(self, plan: dict[float, int]) -> None:
        self.plan = sorted(plan.items())
        self.views: list[tuple[float, FleetView]] = []

    def due(self) -> float:
        return self.plan[0][0] if self.plan else math.inf

    def tick(self, now: float, view: FleetView) -> int | None:
        self.views.append((now, view))
        return self.plan.pop(0)[1]


def trace(*tasks: tuple[float, int, float], horizon: float = 30.0) -> Trace:
    """Tasks as (arrival, priority, duration)."""
    return Trace(
        name="t",
        description="test",
        tasks=tuple(Task(i, a, p, d) for i, (a, p, d) in enumerate(tasks)),
        horizon=horizon,
    )


def fleet(replicas: int = 1, concurrency: int = 1, **kw: object) -> FleetParams:
    defaults: dict[str, object] = {"startup_delay": (1.0, 1.0), "dt": 0.1}
    return FleetParams(queue=Q, concurrency=concurrency, initial_replicas=replicas, **{**defaults, **kw})  # type: ignore[arg-type]


def run(tr: Trace, params: FleetParams, plan: dict[float, int] | None = None) -> SimResult:
    return simulate(tr, Scripted(plan or {}), params)


@pytest.mark.parametrize(
    ("priority", "step"),
    [
        pytest.param(0, 0, id="0-bare-list"),
        pytest.param(2, 0, id="2-still-the-bare-list"),
        pytest.param(3, 3, id="3"),
        pytest.param(5, 3, id="5-rounds-down-to-3"),
        pytest.param(9, 9, id="9"),
        pytest.param(12, 9, id="above-9-clamped"),
    ],
)
def test_priority_step_follows_kombu(priority: int, step: int) -> None:
    assert priority_step(priority) == step


def test_waits_keep_exact_times_inside_a_step() -> None:
    r = run(trace((0.05, 0, 1.0), (0.06, 0, 1.0)), fleet())
    assert r.starts == [0.05, 1.05]
    assert r.waits == pytest.approx([0.0, 0.99])
    assert r.finishes == pytest.approx([1.05, 2.05])


def test_step_0_is_served_first_and_each_list_is_fifo() -> None:
    # One busy worker; then three prioritised messages and two priority-0 ones queue up.
    r = run(
        trace((0.0, 0, 1.0), (0.1, 9, 1.0), (0.2, 3, 1.0), (0.3, 3, 1.0), (0.4, 0, 1.0), (0.5, 0, 1.0)),
        fleet(),
    )
    order = sorted(range(6), key=lambda i: r.starts[i])
    assert order == [0, 4, 5, 2, 3, 1]


def test_new_pods_consume_only_after_the_start_up_delay() -> None:
    # Two 10 s tasks, one warm pod; a second pod asked for at 0.5 s starts 5 s later.
    r = run(trace((0.0, 0, 10.0), (0.1, 0, 10.0)), fleet(startup_delay=(5.0, 5.0)), {0.5: 2})
    assert r.starts[1] == pytest.approx(5.5)


def test_concurrency_and_in_flight() -> None:
    s = Scripted({0.95: 1})
    simulate(trace(*((0.0, 0, 5.0) for _ in range(6))), s, fleet(concurrency=4, prefetch_multiplier=1))
    (_, v) = s.views[0]
    assert v.in_flight == 4  # running; prefetch 1 reserves nothing beyond the processes
    assert sum(v.list_lengths.values()) == 2


def test_prefetch_reserves_beyond_the_processes_and_counts_in_flight() -> None:
    s = Scripted({0.95: 1})
    r = simulate(trace(*((0.0, 0, 5.0) for _ in range(6))), s, fleet(concurrency=2, prefetch_multiplier=2))
    (_, v) = s.views[0]
    assert v.in_flight == 4 and sum(v.list_lengths.values()) == 2
    assert sorted(r.starts)[:4] == [0.0, 0.0, 5.0, 5.0]  # the reserved two wait for a process


def test_workers_with_room_take_turns() -> None:
    # Two warm pods of concurrency 2, two messages: one each (a worker goes to the back of the
    # BRPOP line after each message), so scaling in to 1 removes a busy pod whichever it picks.
    s = Scripted({0.95: 1})
    r = simulate(trace(*((0.0, 0, 5.0) for _ in range(2))), s, fleet(replicas=2, concurrency=2))
    assert r.busy_removals == 1


def busy_newer_idle_older(scale_in: str) -> SimResult:
    # pod 0 warm; pod 1 asked for at 1.0, ready at 2.0. pod 0 runs A until 2.55, so pod 1 is
    # first in line when B lands at 3.0 and runs B (100 s). At 5.0 the tier goes back to 1.
    tr = trace((0.05, 0, 2.5), (3.0, 0, 100.0), horizon=10.0)
    return run(tr, fleet(scale_in=scale_in), {1.0: 2, 5.0: 1})


def test_scale_in_as_the_replicaset_does_removes_the_busy_newer_pod() -> None:
    r = busy_newer_idle_older("replicaset")
    assert r.busy_removals == 1
    assert r.finishes[1] == pytest.approx(103.0)  # warm shutdown: B is not cut short
    # Costs: pod 0 for the whole run, pod 1 from 1.0 until B ends at 103.0.
    assert r.end == pytest.approx(103.0, abs=0.1)
    assert r.worker_seconds == pytest.approx(r.end + (103.0 - 1.0), abs=0.1)
    assert r.drain_seconds == pytest.approx(103.0 - 5.0)


def test_idle_first_scale_in_removes_the_idle_pod() -> None:
    r = busy_newer_idle_older("idle-first")
    assert r.busy_removals == 0
    assert r.drain_seconds == 0
    assert r.worker_seconds == pytest.approx((5.0 - 0.0) + (r.end - 1.0), abs=0.1)


def test_warm_shutdown_returns_reserved_messages_to_the_head_of_their_lists() -> None:
    # Concurrency 1, prefetch 2. pod 0 (warm) runs T0 for 50 s; pod 1 is ready at 2.0 but pod 0
    # has waited in BRPOP since 0.0, so A goes to pod 0 (reserved), B and C to pod 1 (running,
    # reserved); D queues at 4.0. Removing pod 1 (the newest) at 5.0 lets B finish and puts C back
    # at the head of the list: C runs before D, both on pod 0 after T0 and A.
    tr = trace((0.0, 0, 50.0), (3.0, 0, 10.0), (3.05, 0, 10.0), (3.1, 0, 1.0), (4.0, 0, 1.0), horizon=80.0)
    r = run(tr, fleet(replicas=1, prefetch_multiplier=2), {1.0: 2, 5.0: 1})
    assert r.starts[1] == pytest.approx(50.0)  # A: reserved behind T0 on pod 0 (prefetch's cost)
    assert r.starts[2] == pytest.approx(3.05)  # B on pod 1
    assert r.busy_removals == 1
    assert r.finishes[2] == pytest.approx(13.05)  # B is not cut short
    assert r.starts[3] == pytest.approx(60.0)  # C, back at the head
    assert r.starts[4] == pytest.approx(61.0)  # D after it


def test_a_pod_removed_while_starting_costs_its_start_up_only() -> None:
    r = run(trace((0.0, 0, 1.0), horizon=10.0), fleet(startup_delay=(5.0, 5.0)), {1.0: 2, 3.0: 1})
    assert r.worker_seconds == pytest.approx(r.end + 2.0, abs=0.1)
    assert r.busy_removals == 0


def test_static_fleet_costs_its_size_times_the_horizon() -> None:
    tr = step_burst(1, burst_size=50, horizon=300.0)
    r = simulate(tr, StaticFleet(3), fleet(replicas=3, concurrency=4))
    assert r.peak_replicas == 3
    assert r.worker_seconds == pytest.approx(3 * r.end)
    assert r.unfinished == 0


def test_tasks_left_at_the_horizon_extend_the_run() -> None:
    r = run(trace((0.0, 0, 50.0), horizon=10.0), fleet())
    assert r.end == pytest.approx(50.0, abs=0.1)
    assert r.unfinished == 0


HIGH = Tier(name="high", queues=[Q], concurrency=4, replicas=ReplicaBounds(min=2, max=8))


def test_the_operator_scaler_reacts_within_a_poll_and_keda_at_its_sync() -> None:
    tr = trace(*((10.0, 0, 30.0) for _ in range(200)), horizon=60.0)
    ours = simulate(tr, OperatorScaler(HIGH), FleetParams.for_tier(HIGH))
    up = next(t for t, n in zip(ours.samples.t, ours.samples.spec_replicas, strict=True) if n == 8)
    assert 10.0 <= up <= 11.0
    config = KedaHpaConfig(KedaRedisListsTrigger(Q, 10), 2, 8, hpa_phase=14.0, keda_phase=0.0)
    theirs = simulate(tr, KedaHpaScaler(config), FleetParams.for_tier(HIGH))
    first = next(t for t, n in zip(theirs.samples.t, theirs.samples.spec_replicas, strict=True) if n > 2)
    assert first == pytest.approx(14.0, abs=1.0)
    assert max(theirs.samples.spec_replicas[:29]) == 4  # max(2 x 2, 4) on the first sync


def test_in_flight_keeps_the_operator_from_scaling_down_busy_workers() -> None:
    # 32 long tasks fill 8 pods; the lists are empty but in-flight says 32 -> 4 replicas, not 2.
    tr = trace(*((1.0, 0, 300.0) for _ in range(32)), horizon=200.0)
    ours = simulate(tr, OperatorScaler(HIGH), FleetParams.for_tier(HIGH, startup_delay=(5.0, 5.0)))
    i = ours.samples.t.index(150.0)
    assert ours.samples.spec_replicas[i] == 4


def test_same_seed_same_result_and_seeds_differ() -> None:
    tr = poisson_bursts(3, horizon=600.0, quiet_tail=100.0)
    a = simulate(tr, OperatorScaler(HIGH), FleetParams.for_tier(HIGH), seed=3)
    b = simulate(
        poisson_bursts(3, horizon=600.0, quiet_tail=100.0), OperatorScaler(HIGH), FleetParams.for_tier(HIGH), seed=3
    )
    assert a.starts == b.starts and a.worker_seconds == b.worker_seconds
    c = simulate(tr, OperatorScaler(HIGH), FleetParams.for_tier(HIGH), seed=4)
    assert c.starts != a.starts  # the pods' start-up delays are drawn from the seed


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s, f: step_burst(s, prioritised_fraction=f), id="step-burst"),
        pytest.param(lambda s, f: poisson_bursts(s, prioritised_fraction=f), id="poisson-bursts"),
        pytest.param(lambda s, f: diurnal(s, prioritised_fraction=f), id="diurnal"),
    ],
)
def test_traces_are_deterministic_sorted_and_mixed(make: object) -> None:
    build = make  # type: ignore[assignment]
    a, b = build(5, 0.5), build(5, 0.5)  # type: ignore[operator]
    assert a == b
    arrivals = [t.arrival for t in a.tasks]
    assert arrivals == sorted(arrivals)
    assert 0.4 < a.prioritised_fraction < 0.6
    assert {t.priority for t in a.tasks} <= {0, 3, 6, 9}
    assert build(5, 0.0).prioritised_fraction == 0.0  # type: ignore[operator]


def test_diurnal_rate_peaks_mid_period() -> None:
    tr = diurnal(1, base_rate=0.5, peak_rate=10.0, period=1000.0, horizon=1000.0)
    first = sum(1 for t in tr.tasks if t.arrival < 100)
    middle = sum(1 for t in tr.tasks if 450 <= t.arrival < 550)
    assert middle > 5 * first


def test_percentile_matches_numpy_linear() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile(list(range(101)), 95) == 95


def test_fleet_params_for_a_tier() -> None:
    p = FleetParams.for_tier(HIGH)
    assert (p.queue, p.concurrency, p.initial_replicas, p.prefetch_multiplier) == (Q, 4, 2, 1)
    assert dataclasses.replace(p, scale_in="idle-first").scale_in == "idle-first"
