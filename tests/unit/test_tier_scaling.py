"""What the autoscaler keeps of a tier's decisions (planning.tier_scaling): each count derived once."""

from __future__ import annotations

import pytest

from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scaling import Decision, Direction, Reason, Recommendation, TierHistory
from celery_fleet.planning.tier_scaling import applied_replicas, tier_scaling, with_skipped_polls

HISTORY = TierHistory(recommendations=(Recommendation(1.0, 4),))
PREVIOUS = TierScaling(
    desired_replicas=4, queue_depth=400, in_flight=3, last_scale_time="t0", last_scale_reason="Scaled tier high 2 -> 4",
    scheduled=1, busy_workers=2,
)  # fmt: skip


def decision(
    current: int | None,
    desired: int,
    *,
    queue_depth: int | None = None,
    in_flight: int | None = None,
    scheduled: int | None = None,
    busy_workers: int | None = None,
) -> Decision:
    return Decision(
        tier="high", current=current, desired=desired, direction=Direction.HOLD, reason=Reason.STEADY,
        message=f"tier high: {current} -> {desired}", history=HISTORY, queue_depth=queue_depth,
        in_flight=in_flight, scheduled=scheduled, busy_workers=busy_workers,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("d", "scaled_at", "expected"),
    [
        pytest.param(
            decision(4, 6, queue_depth=600, in_flight=0),
            "t1",
            TierScaling(6, 600, 0, "t1", "tier high: 4 -> 6", 1, 2),
            id="written-a-new-scale-time-and-reason",
        ),
        pytest.param(
            decision(4, 4, queue_depth=410, in_flight=2, scheduled=0, busy_workers=4),
            None,
            TierScaling(4, 410, 2, "t0", "Scaled tier high 2 -> 4", 0, 4),
            id="held-keeps-the-last-scale",
        ),
        pytest.param(
            decision(4, 4),
            None,
            TierScaling(4, 400, 3, "t0", "Scaled tier high 2 -> 4", 1, 2),
            id="a-failed-read-keeps-the-last-readings",
        ),
        pytest.param(
            decision(5, 3),
            None,
            TierScaling(3, 400, 3, "t0", "Scaled tier high 2 -> 4", 1, 2),
            id="a-held-scale-down-shows-what-is-wanted",
        ),
    ],
)
def test_the_status_record_follows_the_decision(d: Decision, scaled_at: str | None, expected: TierScaling) -> None:
    assert tier_scaling(d, PREVIOUS, scaled_at=scaled_at) == expected


def test_orphans_are_kept_from_the_last_census_that_covered_the_tier() -> None:
    covered = Decision(
        tier="high", current=1, desired=1, direction=Direction.HOLD, reason=Reason.STEADY, message="m",
        history=HISTORY, queue_depth=0, in_flight=3, orphaned=3,
    )  # fmt: skip
    after = tier_scaling(covered, PREVIOUS)
    assert after.orphaned == 3
    assert tier_scaling(decision(1, 1, queue_depth=0, in_flight=3), after).orphaned == 3, "no census: kept"
    zero = Decision(**{**covered.__dict__, "orphaned": 0})
    assert tier_scaling(zero, after).orphaned == 0, "a covering census that finds none clears it"


@pytest.mark.parametrize(
    ("d", "previous", "written", "expected"),
    [
        pytest.param(decision(4, 6), 4, True, 6, id="written-is-applied"),
        pytest.param(decision(None, 2), None, False, 2, id="no-deployment-yet-is-created-at-the-decision"),
        pytest.param(decision(3, 3), 5, False, 5, id="held-keeps-what-was-applied"),
        pytest.param(decision(5, 3), 5, False, 5, id="a-held-scale-down-is-not-applied"),
        pytest.param(decision(3, 3), None, False, None, id="nothing-written-yet-leaves-the-current-count"),
    ],
)
def test_the_reconciler_applies_only_what_was_written(
    d: Decision, previous: int | None, written: bool, expected: int | None
) -> None:
    assert applied_replicas(d, previous, written=written) == expected


def test_skipped_polls_recommend_the_steady_count() -> None:
    histories = {"high": HISTORY, "low": TierHistory()}
    out = with_skipped_polls(histories, 9.0, {"high": 4, "low": 1, "gone": 2})
    assert out["high"].recommendations == (Recommendation(1.0, 4), Recommendation(9.0, 4))
    assert out["low"].recommendations == (Recommendation(9.0, 1),)
    assert "gone" not in out  # a tier without a history has no window to fill
    assert histories["high"].recommendations == (Recommendation(1.0, 4),)  # the input is not changed


def test_no_skipped_poll_leaves_the_histories() -> None:
    histories = {"high": HISTORY}
    assert with_skipped_polls(histories, None, {"high": 4}) == histories


def test_every_reason_is_either_demand_or_a_limit() -> None:
    """A new Reason must be classed: it either follows demand or limits the tier (status limitedBy)."""
    from celery_fleet.planning.scaling import LIMITING

    demand = {Reason.QUEUE_BACKLOG, Reason.WAIT_TARGET, Reason.QUEUE_DRAINED, Reason.STEADY, Reason.ACTIVATION,
              Reason.IDLE}  # fmt: skip
    assert demand | LIMITING == set(Reason) and not demand & LIMITING


@pytest.mark.parametrize(
    ("reason", "limited_by"),
    [(Reason.BUDGET_LIMITED, "BudgetLimited"), (Reason.BUSY_WORKERS, "BusyWorkers"), (Reason.STEADY, None)],
)
def test_limited_by_is_the_last_decisions_limiting_reason(reason: Reason, limited_by: str | None) -> None:
    d = Decision(
        tier="high", current=4, desired=4, direction=Direction.HOLD, reason=reason, message="m", history=HISTORY,
    )  # fmt: skip
    assert tier_scaling(d, TierScaling(limited_by="AtMaximum")).limited_by == limited_by
