"""The closed-loop check's helpers: the trace file a live producer replays, the prediction, the verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench._sim import (
    CLOSED_LOOP_TIER,
    Prediction,
    Tolerance,
    closed_loop_trace,
    compare_waits,
    predict_waits,
    read_trace,
    write_trace,
)


@pytest.fixture(scope="module")
def prediction() -> Prediction:
    return predict_waits(closed_loop_trace(), CLOSED_LOOP_TIER, startup_delay=(2.0, 4.0))


def test_trace_file_round_trips(tmp_path: Path) -> None:
    trace = closed_loop_trace()
    path = tmp_path / "trace.jsonl"
    write_trace(trace, path)
    back = read_trace(path)
    assert back.name == trace.name and back.horizon == trace.horizon
    assert [(t.id, t.arrival, t.priority) for t in back.tasks] == [(t.id, t.arrival, t.priority) for t in trace.tasks]
    assert [t.duration for t in back.tasks] == pytest.approx([t.duration for t in trace.tasks], abs=1e-6)


def test_the_closed_loop_trace_is_short_and_mixed() -> None:
    trace = closed_loop_trace()
    assert trace.horizon <= 180
    assert 0.3 < trace.prioritised_fraction < 0.7


def test_prediction_covers_every_task_and_scales_up(prediction: Prediction) -> None:
    assert set(prediction.waits) == {t.id for t in closed_loop_trace().tasks}
    assert prediction.replicas[0] == (0.0, CLOSED_LOOP_TIER.replicas.min)
    # 60 queued at a target of 10 per replica: the decision, not replicas.max, sets the peak.
    assert prediction.peak_replicas == 6 < CLOSED_LOOP_TIER.replicas.max
    assert all(w >= 0 for w in prediction.waits.values())


def test_a_live_run_like_the_prediction_agrees(prediction: Prediction) -> None:
    measured = {i: w + 0.3 for i, w in prediction.waits.items()}  # a little slower everywhere
    agreement = compare_waits(
        prediction,
        measured,
        live_peak_replicas=prediction.peak_replicas - 1,
        live_worker_seconds=prediction.worker_seconds * 0.9,
    )
    assert agreement.ok, agreement.report()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(lambda w: {i: x * 2 + 3 for i, x in w.items()}, "p95 wait", id="waits-twice-as-long"),
        pytest.param(lambda w: dict(list(w.items())[:-3]), "never reported", id="tasks-missing"),
        pytest.param(lambda w: {**w, 10_000: 1.0}, "not in the trace", id="unknown-task"),
    ],
)
def test_a_live_run_unlike_the_prediction_fails(prediction: Prediction, change: object, reason: str) -> None:
    measured = change(prediction.waits)  # type: ignore[operator]
    agreement = compare_waits(prediction, measured)
    assert not agreement.ok
    assert reason in agreement.report()


def test_peak_replicas_out_of_tolerance_fails(prediction: Prediction) -> None:
    agreement = compare_waits(prediction, prediction.waits, live_peak_replicas=prediction.peak_replicas - 2)
    assert not agreement.ok
    assert "peak replicas" in agreement.report()


def test_worker_seconds_out_of_tolerance_fails(prediction: Prediction) -> None:
    ok = compare_waits(prediction, prediction.waits, live_worker_seconds=prediction.worker_seconds * 1.2)
    assert ok.ok, ok.report()
    agreement = compare_waits(prediction, prediction.waits, live_worker_seconds=prediction.worker_seconds * 1.5)
    assert not agreement.ok
    assert "worker-seconds" in agreement.report()


def test_tolerance_is_the_larger_of_absolute_and_relative() -> None:
    tol = Tolerance(absolute=2.0, relative=0.25)
    assert tol.allowed(4.0) == 2.0
    assert tol.allowed(20.0) == 5.0
