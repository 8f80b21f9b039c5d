"""The autoscaling decision, as named scenarios: a pool, its starting replicas, then polls over time.

Each poll feeds observations at a time `at`, checks the expected (desired, reason) of the tiers it
names, then plays the operator: the desired count becomes the current one and the returned history
is stored for the next poll.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier
from celery_fleet.planning.scaling import (
    Decision,
    Direction,
    Observation,
    ReadFailure,
    Reason,
    TierHistory,
    TierObservation,
    decide,
    observe_tier,
)

R = Reason


def tier(name: str, lo: int, hi: int, **autoscaling: Any) -> Tier:
    return Tier(
        name=name,
        queues=[f"{name}_priority"],
        concurrency=4,
        replicas=ReplicaBounds(min=lo, max=hi),
        autoscaling=Autoscaling(**autoscaling),
    )


def q(depth: int, in_flight: int = 0) -> Observation:
    return Observation(queue_depth=depth, in_flight=in_flight)


DOWN = ReadFailure("Timeout", "no answer from redis.celery.svc:6379 within 1s")
# A default-tier trio, each at target 10 per replica.
HIGH, MEDIUM, LOW = tier("high", 2, 8), tier("medium", 4, 12), tier("low", 1, 4)
FAST = {"scale_down_stabilization_seconds": 0}
# The scale-down limits before the defaults changed (a 60 s window, a fixed step of 2), set explicitly.
STEP2 = {"scale_down_stabilization_seconds": 60, "scale_down_max_step": 2}
HIGH_STEP2 = tier("high", 2, 8, **STEP2)


@dataclass
class Poll:
    at: float
    seen: dict[str, TierObservation]
    expect: dict[str, tuple[int, Reason]]
    message: dict[str, str] = field(default_factory=dict)  # substrings the message must contain


@dataclass
class Scenario:
    tiers: list[Tier]
    start: dict[str, int | None]
    polls: list[Poll]
    budget: int | None = None
    paused: bool = False


def run(s: Scenario) -> list[tuple[Decision, ...]]:
    current: dict[str, int | None] = dict(s.start)
    histories: dict[str, TierHistory] = {}
    out = []
    for i, poll in enumerate(s.polls):
        decisions = decide(
            s.tiers, poll.seen, current, histories, now=poll.at, max_total_replicas=s.budget, paused=s.paused
        )
        by_name = {d.tier: d for d in decisions}
        for name, (desired, reason) in poll.expect.items():
            d = by_name[name]
            assert (d.desired, d.reason) == (desired, reason), f"poll {i} at t={poll.at}, tier {name}: {d.message}"
        for name, text in poll.message.items():
            assert text in by_name[name].message, f"poll {i}, tier {name}: {by_name[name].message!r}"
        for d in decisions:
            assert "://" not in d.message
            assert d.direction == (
                Direction.HOLD
                if d.desired == (d.current or 0)
                else Direction.UP
                if d.desired > (d.current or 0)
                else Direction.DOWN
            )
            current[d.tier] = d.desired
            histories[d.tier] = d.history
        out.append(decisions)
    return out


def one(t: Tier, start: int | None, seen: TierObservation, desired: int, reason: Reason, **kw: Any) -> Scenario:
    message = kw.pop("message", None)
    return Scenario([t], {t.name: start}, [Poll(0, {t.name: seen}, {t.name: (desired, reason)}, message or {})], **kw)


def polls(name: str, *steps: tuple[float, TierObservation, int, Reason]) -> list[Poll]:
    return [Poll(at, {name: seen}, {name: (want, reason)}) for at, seen, want, reason in steps]


SCENARIOS = [
    # -- queue depth -> replicas ---------------------------------------------------------------------
    pytest.param(one(HIGH, 2, q(0), 2, R.STEADY), id="empty-queue-stays-at-min"),
    pytest.param(
        one(
            tier("high", 2, 8, target_depth_per_replica=100),
            2,
            q(540, 12),
            6,
            R.QUEUE_BACKLOG,
            message={"high": "Scaled tier high 2 -> 6: 540 queued + 12 in flight, target 100 per replica"},
        ),
        id="burst-scales-up-at-once",
    ),
    pytest.param(
        one(HIGH, 2, q(10_000), 8, R.QUEUE_BACKLOG, message={"high": "wants 1000, replicas.max is 8"}),
        id="burst-capped-at-max",
    ),
    pytest.param(one(HIGH, 8, q(10_000), 8, R.AT_MAXIMUM), id="already-at-max-holds"),
    pytest.param(one(HIGH, 2, q(31), 4, R.QUEUE_BACKLOG), id="partial-replica-rounds-up"),
    pytest.param(
        one(
            HIGH,
            2,
            observe_tier(["high_priority"], {"high_priority": 45}, {}),
            5,
            R.QUEUE_BACKLOG,
        ),
        id="prioritised-messages-only",  # the reader sums the sub-lists; see test_brokers
    ),
    pytest.param(
        Scenario(
            [tier("high", 1, 8)],
            {"high": 4},
            polls("high", (0, q(0, 40), 4, R.STEADY), (120, q(0, 40), 4, R.STEADY), (240, q(0, 31), 4, R.STEADY)),
        ),
        id="in-flight-only-keeps-busy-workers",
    ),
    pytest.param(
        Scenario(
            [tier("high", 1, 8, count_in_flight=False, **STEP2)],
            {"high": 4},
            [
                Poll(0, {"high": q(0, 40)}, {"high": (4, R.STABILIZATION_WINDOW)}),
                Poll(61, {"high": q(0, 40)}, {"high": (2, R.QUEUE_DRAINED)}, {"high": "40 in flight, not counted"}),
            ],
        ),
        id="in-flight-not-counted-scales-down",
    ),
    pytest.param(
        Scenario(
            [tier("high", 1, 8, target_depth_per_replica=5)],
            {"high": 1},
            polls("high", (0, q(3, 20), 5, R.QUEUE_BACKLOG)),
        ),
        id="in-flight-plus-queued-scales-up",
    ),
    # -- activation and cooldown (min 0) ---------------------------------------------------------------
    pytest.param(
        one(tier("low", 0, 4, activation_depth=5), 0, q(5), 0, R.BELOW_ACTIVATION), id="at-activation-stays-0"
    ),
    pytest.param(one(tier("low", 0, 4, activation_depth=5), 0, q(6), 1, R.ACTIVATION), id="above-activation-starts-1"),
    pytest.param(one(tier("low", 0, 4), 0, q(0), 0, R.STEADY), id="idle-at-zero-stays-zero"),
    pytest.param(one(tier("low", 0, 8), 0, q(75), 8, R.ACTIVATION), id="burst-from-zero-goes-straight-up"),
    pytest.param(
        Scenario(
            [tier("low", 0, 4)],
            {"low": 1},
            polls(
                "low",
                (0, q(0), 1, R.STABILIZATION_WINDOW),
                (61, q(0), 1, R.COOLDOWN),
                (119, q(0), 1, R.COOLDOWN),
                (120, q(0), 0, R.IDLE),
                (130, q(0), 0, R.STEADY),
            ),
        ),
        id="cooldown-then-scale-to-zero",
    ),
    pytest.param(
        Scenario(
            [tier("low", 0, 4, **STEP2)],
            {"low": 1},
            polls(
                "low",
                (0, q(0), 1, R.STABILIZATION_WINDOW),
                (100, q(2), 1, R.STEADY),
                (130, q(0), 1, R.STABILIZATION_WINDOW),
                (200, q(0), 1, R.COOLDOWN),
                (249, q(0), 1, R.COOLDOWN),
                (250, q(0), 0, R.IDLE),
            ),
        ),
        id="new-message-restarts-cooldown",
    ),
    pytest.param(
        Scenario(
            [tier("low", 0, 4, count_in_flight=False)],
            {"low": 1},
            polls(
                "low",
                (0, q(0, 3), 1, R.STABILIZATION_WINDOW),
                (100, q(0, 3), 1, R.COOLDOWN),
                (400, q(0, 1), 1, R.COOLDOWN),
            ),
        ),
        id="uncounted-in-flight-still-blocks-zero",
    ),
    # -- scale-down: stabilization window and step ----------------------------------------------------
    pytest.param(one(HIGH, 8, q(0), 8, R.STABILIZATION_WINDOW), id="restart-never-scales-down-at-once"),
    pytest.param(one(tier("high", 2, 8, **FAST), 8, q(0), 2, R.QUEUE_DRAINED), id="no-window-100-percent-at-once"),
    pytest.param(
        one(tier("high", 2, 8, scale_down_max_step=2, **FAST), 8, q(0), 6, R.QUEUE_DRAINED),
        id="no-window-fixed-step-steps-down",
    ),
    pytest.param(
        Scenario(
            [tier("high", 2, 8, scale_down_max_percent=50, **FAST)],
            {"high": 8},
            polls(
                "high",
                (0, q(0), 4, R.QUEUE_DRAINED),  # 50 % of 8
                (10, q(0), 4, R.SCALE_DOWN_LIMITED),  # 50 % of the period's start (8) already used
                (16, q(0), 2, R.QUEUE_DRAINED),  # a new period: 50 % of 4
            ),
        ),
        id="percent-step-of-the-period-start",
    ),
    pytest.param(
        Scenario(
            [tier("high", 1, 8, scale_down_max_percent=10, **FAST)],
            {"high": 3},
            [Poll(0, {"high": q(0)}, {"high": (2, R.QUEUE_DRAINED)}, {"high": "at most 10% per 15s"})],
        ),
        id="percent-step-rounds-up-to-one",
    ),
    pytest.param(
        Scenario(
            [HIGH_STEP2],
            {"high": 6},
            polls(
                "high",
                (0, q(60), 6, R.STEADY),
                (10, q(10), 6, R.STABILIZATION_WINDOW),  # a dip
                (20, q(60), 6, R.STEADY),
                (75, q(10), 6, R.STABILIZATION_WINDOW),  # t=20's 6 is still in the window
                (81, q(10), 4, R.QUEUE_DRAINED),
                (90, q(10), 4, R.SCALE_DOWN_LIMITED),  # 2 per 15s already used
                (96, q(10), 2, R.QUEUE_DRAINED),
            ),
        ),
        id="stabilization-with-a-dip",
    ),
    pytest.param(
        Scenario(
            [HIGH],
            {"high": 2},
            [
                Poll(
                    float(t),
                    {"high": q(80 if t % 10 == 0 else 0)},
                    {"high": (8, R.QUEUE_BACKLOG if t == 0 else R.STEADY if t % 10 == 0 else R.STABILIZATION_WINDOW)},
                )
                for t in range(0, 300, 5)
            ],
        ),
        id="flapping-input-never-flaps-replicas",
    ),
    pytest.param(
        Scenario(
            [tier("high", 2, 8, scale_down_max_step=3, **FAST)],
            {"high": 8},
            polls(
                "high",
                (0, q(0), 5, R.QUEUE_DRAINED),
                (5, q(0), 5, R.SCALE_DOWN_LIMITED),
                (15, q(0), 2, R.QUEUE_DRAINED),
            ),
        ),
        id="scale-down-step-per-period",
    ),
    pytest.param(
        Scenario(
            [tier("high", 2, 8, scale_up_max_step=2)],
            {"high": 2},
            [
                Poll(0, {"high": q(100)}, {"high": (4, R.QUEUE_BACKLOG)}, {"high": "heading to 8, at most 2 per 15s"}),
                Poll(5, {"high": q(100)}, {"high": (4, R.SCALE_UP_LIMITED)}),
                Poll(15, {"high": q(100)}, {"high": (6, R.QUEUE_BACKLOG)}),
            ],
        ),
        id="scale-up-step-per-period",
    ),
    # -- pool budget ------------------------------------------------------------------------------------
    pytest.param(
        Scenario(
            [HIGH, MEDIUM, LOW],
            {"high": 2, "medium": 4, "low": 1},
            [
                Poll(
                    0,
                    {"high": q(500), "medium": q(500), "low": q(500)},
                    {"high": (8, R.QUEUE_BACKLOG), "medium": (5, R.BUDGET_LIMITED), "low": (1, R.BUDGET_LIMITED)},
                    {"medium": "wants 12, maxTotalReplicas 14 leaves it 5 (9 go to the other tiers)"},
                )
            ],
            budget=14,
        ),
        id="budget-contention-across-three-tiers",
    ),
    pytest.param(
        Scenario(
            [HIGH, MEDIUM, LOW],
            {"high": 2, "medium": 8, "low": 2},
            [
                Poll(
                    0,
                    {"high": q(500), "medium": q(80), "low": q(0)},
                    {"high": (8, R.QUEUE_BACKLOG), "medium": (7, R.BUDGET_LIMITED), "low": (1, R.BUDGET_LIMITED)},
                )
            ],
            budget=16,
        ),
        id="budget-cuts-lower-tiers-at-once",
    ),
    pytest.param(
        Scenario(
            [HIGH, MEDIUM, tier("low", 3, 4)],
            {"high": 2, "medium": 4, "low": 3},
            [
                Poll(
                    0,
                    {"high": q(500), "medium": q(500), "low": q(500)},
                    {"high": (3, R.BUDGET_LIMITED), "medium": (4, R.BUDGET_LIMITED), "low": (3, R.BUDGET_LIMITED)},
                )
            ],
            budget=10,
        ),
        id="min-above-budget-share-is-kept",
    ),
    pytest.param(
        Scenario(
            [HIGH, MEDIUM, LOW],
            {"high": 2, "medium": 4, "low": 1},
            [
                Poll(
                    0,
                    {"high": q(30), "medium": q(50), "low": q(10)},
                    {"high": (3, R.QUEUE_BACKLOG), "medium": (5, R.QUEUE_BACKLOG), "low": (1, R.STEADY)},
                )
            ],
            budget=20,
        ),
        id="budget-not-reached-changes-nothing",
    ),
    pytest.param(
        Scenario(
            [HIGH, MEDIUM, LOW],
            {"high": 6, "medium": 4, "low": 1},
            [
                Poll(
                    0,
                    {"high": DOWN, "medium": q(500), "low": q(500)},
                    {"high": (6, R.BROKER_UNREACHABLE), "medium": (5, R.BUDGET_LIMITED), "low": (1, R.BUDGET_LIMITED)},
                )
            ],
            budget=12,
        ),
        id="budget-keeps-a-failed-tier-where-it-is",
    ),
    # -- broker failures --------------------------------------------------------------------------------
    pytest.param(
        one(HIGH, 5, DOWN, 5, R.BROKER_UNREACHABLE, message={"high": "broker read failed (Timeout: no answer"}),
        id="read-failure-holds",
    ),
    pytest.param(
        one(tier("high", 2, 8, fallback_replicas=2), 5, DOWN, 5, R.BROKER_UNREACHABLE),
        id="fallback-below-current-never-lowers",
    ),
    pytest.param(
        one(tier("high", 2, 8, fallback_replicas=6), 2, DOWN, 6, R.FALLBACK_REPLICAS),
        id="fallback-above-current-raises",
    ),
    pytest.param(
        Scenario(
            [HIGH_STEP2],
            {"high": 6},
            polls(
                "high",
                (0, q(60), 6, R.STEADY),
                (30, DOWN, 6, R.BROKER_UNREACHABLE),
                (200, DOWN, 6, R.BROKER_UNREACHABLE),
                (205, q(0), 6, R.STABILIZATION_WINDOW),  # the outage's held count is in the window
                (261, q(0), 4, R.QUEUE_DRAINED),
            ),
        ),
        id="recovery-waits-a-window-before-scaling-down",
    ),
    pytest.param(
        one(
            HIGH,
            3,
            ReadFailure("AuthFailed", "WRONGPASS for redis://:hunter2@redis:6379/0"),
            3,
            R.BROKER_UNREACHABLE,
            message={"high": "<broker-url>"},
        ),
        id="failure-message-never-carries-a-url",
    ),
    pytest.param(
        Scenario([HIGH], {"high": 4}, [Poll(0, {}, {"high": (4, R.BROKER_UNREACHABLE)})]),
        id="missing-observation-holds",
    ),
    # -- paused, bounds, new tiers ------------------------------------------------------------------------
    pytest.param(one(HIGH, 3, q(10_000), 3, R.PAUSED, paused=True), id="paused-pool-holds"),
    pytest.param(
        Scenario(
            [HIGH, MEDIUM],
            {"high": 8, "medium": 12},
            [Poll(0, {"high": q(0), "medium": q(0)}, {"high": (8, R.PAUSED), "medium": (12, R.PAUSED)})],
            budget=12,
            paused=True,
        ),
        id="paused-pool-ignores-budget",
    ),
    pytest.param(one(HIGH, None, q(50), 2, R.PAUSED, paused=True), id="paused-pool-starts-a-new-tier-at-min"),
    pytest.param(one(HIGH, 11, q(0), 8, R.ABOVE_MAXIMUM), id="max-lowered-applies-at-once"),
    pytest.param(one(HIGH, 0, q(0), 2, R.BELOW_MINIMUM), id="min-raised-applies-at-once"),
    pytest.param(one(HIGH, 11, DOWN, 8, R.ABOVE_MAXIMUM), id="max-lowered-applies-during-outage"),
    pytest.param(one(HIGH, None, q(35), 4, R.QUEUE_BACKLOG), id="new-tier-starts-from-demand"),
    pytest.param(one(HIGH, None, q(0), 2, R.STEADY), id="new-tier-starts-at-min"),
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario: Scenario) -> None:
    run(scenario)


def test_there_are_enough_named_scenarios() -> None:
    assert len(SCENARIOS) >= 25


def test_history_records_the_scale() -> None:
    (d,) = decide([HIGH], {"high": q(55)}, {"high": 2}, {}, now=100.0)
    assert (d.desired, d.history.last_scale_time, d.history.last_scale_reason) == (6, 100.0, "QueueBacklog")
    assert (d.queue_depth, d.in_flight, d.recommended) == (55, 0, 6)
    assert d.changed
    (held,) = decide([HIGH], {"high": q(55)}, {"high": 6}, {"high": d.history}, now=101.0)
    assert held.history.last_scale_time == 100.0 and not held.changed


def test_history_stays_bounded() -> None:
    history, current = TierHistory(), 2
    for t in range(0, 3600, 1):
        (d,) = decide([HIGH], {"high": q((t * 37) % 90)}, {"high": current}, {"high": history}, now=float(t))
        history, current = d.history, d.desired
    assert len(history.recommendations) <= 61
    assert len(history.scale_events) <= 16


def test_approximate_in_flight_is_marked() -> None:
    (d,) = decide([HIGH], {"high": Observation(5, 40, in_flight_exact=False)}, {"high": 2}, {}, now=0.0)
    assert "~40 in flight" in d.message


def test_observe_tier_sums_the_tiers_queues_once() -> None:
    seen = observe_tier(["a", "b", "a"], {"a": 3, "b": 4, "c": 100}, {"b": 2, "c": 9})
    assert seen == Observation(queue_depth=7, in_flight=2)


@pytest.mark.parametrize(
    ("current", "fallback"),
    list(itertools.product([0, 1, 2, 5, 8], [None, 0, 2, 5, 8])),
)
def test_a_read_failure_never_lowers_a_tier(current: int, fallback: int | None) -> None:
    t = tier("low", 0, 8, fallback_replicas=fallback)
    history = TierHistory()
    for now, seen in [(0.0, q(500)), (1.0, q(0)), (100.0, q(0))]:
        (d,) = decide([t], {"low": seen}, {"low": current}, {"low": history}, now=now)
        history = d.history
    (d,) = decide([t], {"low": DOWN}, {"low": current}, {"low": history}, now=500.0)
    assert d.desired >= current
