"""What the autoscaler keeps of a tier between polls, derived from its decisions (pure).

The decision (``planning.scaling.Decision``) is the one source of a tier's desired replicas; what
is kept of it is derived here, once:

* the status record (:class:`~celery_fleet.planning.pool_status.TierScaling`, ``desiredReplicas``):
  the desired count of the last decision, whether it was written or held;
* the count the pool reconciler puts in ``spec.replicas`` (:func:`applied_replicas`): the desired
  count of the last decision that was written, or made for a tier with no Deployment yet. It lags
  the status count only while a decision is held (a broker outage never lowers a tier; the
  autoscaler agreed with a count someone else wrote), so the reconciler keeps what was applied;
* the recommendations of polls skipped because nothing changed (:func:`with_skipped_polls`): the
  steady count, which is the current count of the tiers (a steady decision keeps every tier).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scaling import LIMITING, Decision, Recommendation, TierHistory


def tier_scaling(d: Decision, previous: TierScaling, *, scaled_at: str | None = None) -> TierScaling:
    """The status record after decision `d`: a reading the decision lacks (a failed read, workers
    not asked) keeps the previous one; `scaled_at` (the write's time) when `d` was written."""
    return TierScaling(
        desired_replicas=d.desired,
        queue_depth=d.queue_depth if d.queue_depth is not None else previous.queue_depth,
        in_flight=d.in_flight if d.in_flight is not None else previous.in_flight,
        last_scale_time=scaled_at if scaled_at is not None else previous.last_scale_time,
        last_scale_reason=d.message if scaled_at is not None else previous.last_scale_reason,
        scheduled=d.scheduled if d.scheduled is not None else previous.scheduled,
        busy_workers=d.busy_workers if d.busy_workers is not None else previous.busy_workers,
        stale_unacked=d.stale_unacked if d.stale_unacked is not None else previous.stale_unacked,
        orphaned=d.orphaned if d.orphaned is not None else previous.orphaned,
        limited_by=d.reason.value if d.reason in LIMITING else None,
    )


def applied_replicas(d: Decision, previous: int | None, *, written: bool) -> int | None:
    """The count the reconciler applies after decision `d` (`previous`: the one before; None: none yet)."""
    return d.desired if written or d.current is None else previous


def with_skipped_polls(
    histories: Mapping[str, TierHistory], skipped_at: float | None, current: Mapping[str, int | None]
) -> dict[str, TierHistory]:
    """Histories with the skipped polls' recommendation (the steady `current` count, as of the last
    skipped poll) in each tier's stabilization window."""
    out = dict(histories)
    if skipped_at is None:
        return out
    for tier, replicas in current.items():
        h = out.get(tier)
        if h is not None and replicas is not None:
            out[tier] = replace(h, recommendations=(*h.recommendations, Recommendation(skipped_at, replicas)))
    return out
