"""The wait-target estimators and staffing policy (pure): known queueing values, drift, the rules."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from pydantic import ValidationError

from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier
from celery_fleet.planning.scaling import Decision, Observation, Reason, TierHistory, decide
from celery_fleet.planning.wait_estimators import ArrivalRate, ServiceTime, StartUp, WaitEstimates, completions
from celery_fleet.planning.wait_target import (
    Fleet,
    Load,
    StaffingRule,
    WaitTarget,
    erlang_c,
    staff,
    wait_quantile,
)

# -- queueing formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "a", "expected"),
    [
        pytest.param(1, 0.5, 0.5, id="M/M/1: rho"),
        pytest.param(2, 1.0, 1 / 3, id="M/M/2 a=1"),
        pytest.param(3, 2.0, 4 / 9, id="M/M/3 a=2"),
        pytest.param(2, 2.0, 1.0, id="saturated"),
        pytest.param(5, 0.0, 0.0, id="no load"),
    ],
)
def test_erlang_c_known_values(n: int, a: float, expected: float) -> None:
    assert erlang_c(n, a) == pytest.approx(expected)


def test_wait_quantile_matches_mm1_closed_form() -> None:
    # M/M/1, rho 0.5, S 1: P(W > t) = rho exp(-(1 - rho) t): p95 = ln(0.5 / 0.05) / 0.5.
    assert wait_quantile(1, 0.5, 1.0, 1.0, 95) == pytest.approx(2 * math.log(10))
    assert wait_quantile(1, 0.5, 1.0, 1.0, 40) == 0.0  # P(W > 0) = 0.5 < 0.6
    assert math.isinf(wait_quantile(2, 2.0, 1.0, 1.0, 95))


def test_steady_staffing_grows_like_square_root_of_the_load() -> None:
    # Halfin-Whitt: holding P(wait > 0) at 5 % (a zero target) needs n ~ a + beta sqrt(a), beta ~ 1.9.
    target = WaitTarget(0.0, 95)
    extra = []
    for rate in (10.0, 100.0, 1000.0):
        s = staff(target, Load(rate, 1.0), Fleet(concurrency=1, ready_pods=0, queued=0, in_flight=0))
        assert s.rule is StaffingRule.STEADY
        assert s.predicted_wait <= target.seconds
        extra.append((s.pods - rate) / math.sqrt(rate))  # beta of square-root staffing
    assert all(1.5 < beta < 2.3 for beta in extra), extra
    assert max(extra) - min(extra) < 0.5  # about constant: the safety margin grows as sqrt(a)


def test_variability_asks_for_more_slots() -> None:
    fleet = Fleet(concurrency=1, ready_pods=0, queued=0, in_flight=0)
    smooth = staff(WaitTarget(1.0), Load(20.0, 1.0, service_scv=0.2, arrival_scv=0.5), fleet)
    rough = staff(WaitTarget(1.0), Load(20.0, 1.0, service_scv=4.0, arrival_scv=3.0), fleet)
    assert rough.pods > smooth.pods


def test_longer_target_never_asks_for_more() -> None:
    fleet = Fleet(concurrency=4, ready_pods=2, queued=50, in_flight=8)
    load = Load(3.0, 2.5, startup=12)
    pods = [staff(WaitTarget(t), load, fleet).pods for t in (2, 5, 10, 30, 120)]
    assert pods == sorted(pods, reverse=True)


# -- the rules --------------------------------------------------------------------------------------


def test_backlog_drains_within_the_target_minus_startup() -> None:
    # 300 queued, 2 warm pods x 4, 15 s start-up, 30 s target: new slots work 15 s of the 30.
    s = staff(WaitTarget(30), Load(0.5, 2.75, startup=15), Fleet(4, 2, queued=300, in_flight=8))
    assert s.rule is StaffingRule.BACKLOG and s.reachable
    slots, a = s.pods * 4, 0.5 * 2.75
    drained = (8 - a) * 30 + (slots - 8) * (30 - 15)
    assert drained >= 300 * 2.75  # enough
    assert drained - 4 * 15 < 300 * 2.75  # one pod fewer would not be
    assert "300 queued" in s.message and "start-up 15s" in s.message


def test_oldest_age_shortens_the_horizon() -> None:
    load, fleet = Load(0.5, 2.75, startup=5), Fleet(4, 2, queued=100, in_flight=8)
    fresh = staff(WaitTarget(30), load, fleet)
    old = staff(WaitTarget(30), load, Fleet(4, 2, queued=100, in_flight=8, oldest_age=12.0))
    assert old.pods > fresh.pods
    assert "oldest waiting 12.0s" in old.message


def test_startup_longer_than_the_target_is_said() -> None:
    s = staff(WaitTarget(5), Load(1.0, 2.0, startup=20), Fleet(2, 1, queued=100, in_flight=2))
    assert not s.reachable
    assert "cannot drain within 5s with a 20s start-up" in s.message


def test_never_below_the_messages_in_flight() -> None:
    s = staff(WaitTarget(60), Load(0.1, 1.0), Fleet(4, 5, queued=0, in_flight=17))
    assert s.rule is StaffingRule.BUSY and s.pods == 5


def test_no_load_no_pods_and_hold_follows_startup() -> None:
    s = staff(WaitTarget(10), Load(0.0, 2.0, startup=20), Fleet(4, 3, queued=0, in_flight=0))
    assert s.pods == 0 and s.rule is StaffingRule.IDLE
    assert s.hold_seconds == pytest.approx(20.0)  # one start-up: the ski-rental break-even


# -- estimators -------------------------------------------------------------------------------------


def _poisson_counts(rng: random.Random, rate: float, polls: int) -> list[int]:
    out = []
    for _ in range(polls):
        n, t = 0, rng.expovariate(rate)
        while t < 1.0:
            n, t = n + 1, t + rng.expovariate(rate)
        out.append(n)
    return out


def test_arrival_rate_and_dispersion() -> None:
    rng = random.Random(1)
    est = ArrivalRate()
    for i, n in enumerate(_poisson_counts(rng, 5.0, 400)):
        est = est.observe(float(i + 1), n, 1.0)
    assert est.rate == pytest.approx(5.0, rel=0.25)
    assert 0.5 < est.ca2 < 1.6  # Poisson: about 1
    # A burst far above the rate is clipped: it is the backlog rule's, not the steady rate's.
    bursty = est.observe(401.0, 500, 1.0)
    assert bursty.rate < 1.2 * est.rate
    assert bursty.ca2 < 4


def test_arrival_rate_follows_a_step() -> None:
    est = ArrivalRate()
    for i in range(200):
        est = est.observe(float(i + 1), 2, 1.0)
    for i in range(200, 260):  # 3 half-lives at the new rate
        est = est.observe(float(i + 1), 8, 1.0)
    assert est.rate == pytest.approx(8.0, rel=0.15)


def test_service_time_follows_a_doubling_within_a_few_half_lives() -> None:
    rng = random.Random(2)
    est = ServiceTime()
    t = 0.0
    for _ in range(300):
        t += 1.0
        est = est.observe(t, [(rng.lognormvariate(math.log(2.0), 0.8), 1.0) for _ in range(3)])
    before = est.mean
    assert before == pytest.approx(2.0 * math.exp(0.32), rel=0.2)
    assert est.scv == pytest.approx(math.exp(0.64) - 1, rel=0.5)  # lognormal sigma 0.8
    for _ in range(60):  # 3 half-lives of doubled tasks
        t += 1.0
        est = est.observe(t, [(rng.lognormvariate(math.log(4.0), 0.8), 1.0) for _ in range(3)])
    assert est.mean == pytest.approx(2 * before, rel=0.2)
    assert est.quantile(0.5) == pytest.approx(4.0, rel=0.3)


def test_service_time_skips_corrupt_samples() -> None:
    est = ServiceTime().observe(1.0, [(math.nan, 1.0), (-1.0, 1.0), (2.0, 0.0), (3.0, 1.0)])
    assert est.weight == 1.0 and est.mean == 3.0


def test_startup_planning_is_mean_plus_a_deviation() -> None:
    est = StartUp().observe(10.0, [10.0, 20.0])
    assert est.mean == pytest.approx(15.0)
    assert est.planning == pytest.approx(20.0)
    assert not StartUp().known


def test_startup_is_measured_from_a_raise_to_ready() -> None:
    est = WaitEstimates().observe(0.0, 0, 0, None, replicas=2, ready=2)
    est = est.observe(1.0, 50, 0, None, replicas=2, ready=2)  # this poll's decision raises to 5
    est = est.observe(2.0, 50, 0, None, replicas=5, ready=2)  # raised at 1.0 (the last poll's decision)
    est = est.observe(9.0, 40, 0, None, replicas=5, ready=4)
    assert not est.startup.known
    est = est.observe(14.0, 30, 0, None, replicas=5, ready=5)
    assert est.startup.mean == pytest.approx(13.0) and est.ordered == ()
    lowered = est.observe(15.0, 0, 0, None, replicas=8, ready=5).observe(16.0, 0, 0, None, replicas=6, ready=5)
    assert lowered.ordered == ()  # lowered below the raise before it was ready: never completes


def test_completions_weigh_short_tasks_by_inverse_visibility() -> None:
    before = {"a": 10.0, "b": 19.5, "c": 5.0}
    got = completions(before, {"c": 5.0}, before_at=20.0, now=21.0)
    by_run = sorted(got.samples)
    # a: delivered 10, gone between 20 and 21: ran ~10.5 s, weight 1. b: ran ~1 s (seen once): weight 1.
    assert by_run[0] == pytest.approx((1.0, 1.0))
    assert by_run[1] == pytest.approx((10.5, 1.0))
    short = completions({"x": 20.0}, {}, before_at=20.0, now=22.0)  # ran ~1 s, seen with p 1/2
    assert short.completed == pytest.approx(2.0)


# -- the decision with targetWaitSeconds ------------------------------------------------------------


def _tier(**autoscaling: Any) -> Tier:
    return Tier(
        name="t", queues=["t"], concurrency=4, replicas=ReplicaBounds(min=1, max=30),
        autoscaling=Autoscaling(target_wait_seconds=10, **autoscaling),
    )  # fmt: skip


def _run(tier: Tier, polls: list[tuple[int, dict[str, float], tuple[float, ...]]], current: int) -> Decision:
    """Poll once a second: (queued, in-flight ages, start-ups seen) each; the last decision."""
    history = TierHistory()
    d: Decision | None = None
    for i, (queued, ages, startups) in enumerate(polls):
        obs = Observation(queue_depth=queued, in_flight=len(ages), in_flight_ages=ages, startups=startups)
        (d,) = decide([tier], {"t": obs}, {"t": current}, {"t": history}, now=float(i))
        history, current = d.history, d.desired
    assert d is not None
    return d


def _steady_polls(n: int, per_poll: int, run: float) -> list[tuple[int, dict[str, float], tuple[float, ...]]]:
    """``per_poll`` tasks delivered each second, each running ``run`` seconds, nothing queued."""
    out = []
    for t in range(n):
        ages = {f"{s}-{j}": float(t - s) for s in range(max(0, t - int(run) + 1), t + 1) for j in range(per_poll)}
        out.append((0, ages, (12.0,) if t == 0 else ()))
    return out


def test_cold_estimates_fall_back_to_the_depth_rule() -> None:
    (d,) = decide([_tier()], {"t": Observation(queue_depth=95, in_flight=4)}, {"t": 2}, {}, now=0.0)
    assert d.desired == 10 and d.reason is Reason.QUEUE_BACKLOG  # ceil(99 / 10): no run time measured yet
    assert d.predicted_wait is None and d.history.wait is not None


def test_steady_load_is_staffed_for_the_target_and_says_it_in_numbers() -> None:
    # 6 tasks/s x 3 s = 18 busy slots (run times read as 2.5 s: gone between polls, the midpoint):
    # evenly spaced arrivals (ca2 ~0) need no margin for a 10 s p95, so the busy slots decide.
    d = _run(_tier(), _steady_polls(120, 6, 3.0), current=2)
    assert d.desired == 5, d.message
    assert d.predicted_wait is not None and d.predicted_wait <= 10
    assert "5 workers for 18 in flight" in d.message
    assert "at 6.00 tasks/s x 2.50s" in d.message and "start-up 12s" in d.message


def _first_scale_down_after_load_stops(tier: Tier) -> int:
    polls = _steady_polls(120, 6, 3.0) + [(0, {}, ())] * 80  # load stops at t=120
    history, current = TierHistory(), 6
    for i, (queued, ages, startups) in enumerate(polls):
        obs = Observation(queue_depth=queued, in_flight=len(ages), in_flight_ages=ages, ready_replicas=current,
                          startups=startups)  # fmt: skip
        (d,) = decide([tier], {"t": obs}, {"t": current}, {"t": history}, now=float(i))
        if d.desired < current and i >= 120:
            return i
        history, current = d.history, d.desired
    raise AssertionError("never scaled down")


def test_scale_down_waits_one_start_up_not_the_default_window() -> None:
    # Held ~12 s (the measured start-up: delayed turn-off), not the default 30 s window.
    assert 120 + 10 <= _first_scale_down_after_load_stops(_tier()) <= 120 + 16


def test_an_explicit_window_still_wins() -> None:
    assert _first_scale_down_after_load_stops(_tier(scale_down_stabilization_seconds=60)) >= 120 + 58


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("targetWaitSeconds", 0, id="zero seconds"),
        pytest.param("targetWaitSeconds", 86_401, id="over a day"),
        pytest.param("targetWaitPercentile", 100, id="p100"),
        pytest.param("targetWaitPercentile", 10, id="p10"),
    ],
)
def test_the_field_is_validated(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field.replace("target", "target_").lower()[:10] + "|" + field):
        Autoscaling.model_validate({field: value})


def test_readings_closer_than_half_a_second_do_not_make_a_rate() -> None:
    est = WaitEstimates().observe(0.0, 0, 1, {"a": 0.5})
    again = est.observe(0.01, 40, 1, {"a": 0.51})  # a decision taken again right after a census
    assert again.arrivals == est.arrivals and again.at == 0.0


def test_the_slot_search_stops_at_replicas_max() -> None:
    # A million busy slots on a tier of at most 10 pods x 4: asks for more than the max, fast.
    s = staff(WaitTarget(5), Load(1e6, 1.0), Fleet(4, 10, queued=0, in_flight=0, max_pods=10))
    assert s.pods == 11  # one slot past the max: the caller clamps and reports AtMaximum
