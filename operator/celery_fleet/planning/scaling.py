# Over 500 lines on purpose: one pure decision (demand, activation, windows, step, budget), read as one.
"""Autoscaling decisions for the worker tiers of one pool: a pure function of what was observed.

``decide(tiers, observations, current, histories, now=..., max_total_replicas=..., paused=...)``
returns one :class:`Decision` per tier, in tier order. Nothing here does I/O or reads a clock:
the caller gathers (queue depth, in-flight count, current replicas), calls ``decide`` and acts on
``Decision.desired``; it stores ``Decision.history`` for the next poll once the replicas were
written (the history records the scale as done).

The rules, per tier (``a`` is ``tier.autoscaling``):

* demand = queued (every priority sub-list) + in-flight (when ``a.count_in_flight``);
  recommendation = ceil(demand / ``a.target_depth_per_replica``), clamped to ``tier.replicas``.
* Activation (``min: 0``): a tier at 0 starts only when demand > ``a.activation_depth``; it goes
  back to 0 only after the queue was empty AND nothing was in flight for ``a.cooldown_seconds``
  (in-flight work always blocks scale-to-zero, counted or not: that would kill running tasks).
* Scale-up is immediate, at most ``a.scale_up_max_step`` replicas added per
  ``a.scale_up_period_seconds`` when a step is set.
* Scale-down follows the highest recommendation of the last ``a.scale_down_stabilization_seconds``
  (as the HPA does), removing at most ``a.scale_down_max_step`` per ``a.scale_down_period_seconds``
  when that is set, else ``a.scale_down_max_percent`` of the replicas the tier had at the start
  of that period (rounded up, at least 1; the HPA's rule, default 100 %).
  A fresh history (first poll, operator restart) starts the window with the current replica
  count, so a restart never scales down before a full window of observations.
* Wait target (``a.target_wait_seconds``): once run times are measured, the recommendation is
  ``planning.wait_target.staff`` (Erlang C for steady load, the backlog drained within the target
  minus the start-up, never below what is in flight) from the estimates kept in
  ``TierHistory.wait``, instead of the depth rule; the scale-down window becomes one measured
  start-up (delayed turn-off), or ``a.scale_down_stabilization_seconds`` when set explicitly and longer.
* Read failure: hold the current replicas. ``a.fallback_replicas`` only ever raises (never lowers)
  a tier: "never scale down because a read failed" wins over the fallback. A failed poll counts as
  a recommendation of the held count, so the window after recovery still starts from it.
* Budget (``max_total_replicas``): when the tiers want more in total, tiers are served in list
  order (the first is the highest priority); each keeps at least its minimum (a tier whose read
  failed keeps what it holds), lower tiers get what is left. The budget is a hard cap: it cuts
  a lower tier at once, without waiting for the stabilization window.
* Replica bounds are a hard cap too: a tier above ``max`` (the spec was lowered) goes to ``max``
  at once, a tier below ``min`` goes to ``min``.
* Paused pool: every tier holds its current replicas; nothing else is evaluated, and the
  window is forgotten, so after the pause scale-down waits a full window of fresh observations.
* Busy workers (``workers``: what the tier's workers answered through Celery remote control,
  asked by the caller only when a first ``decide`` without it wants to shrink the tier, or to
  grow it on in-flight work): a tier never goes below its busy workers (running or reserved
  tasks, or not answering), neither by scale-down nor by the budget, unless
  ``a.scale_in_busy_workers`` is ``Remove``; the message says how many were kept. ETA /
  countdown tasks the workers hold are scheduled work: they leave the in-flight count (they sit
  in ``unacked`` until due) and are reported as ``scheduled``; a worker holding them counts as busy
  (removing it requeues them and forgets its revokes), so a tier never goes to 0 while they are held.
  Messages reserved behind a running task (early ack, default prefetch: the "prefetch hostage")
  leave the in-flight count too: only that worker can run them, new pods never get them. When every
  live worker answered, in-flight work none of them holds is orphaned (a dead worker's): reported,
  not demand, and it asks for one worker at most (kombu restores it from a live consumer).
* An approximate (extrapolated) in-flight count never lets a tier go from 1 to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from celery_fleet.api.models import Autoscaling, BusyWorkers, Tier
from celery_fleet.planning.redact import redact_urls
from celery_fleet.planning.scale_in import TierWorkers
from celery_fleet.planning.wait_estimators import WaitEstimates
from celery_fleet.planning.wait_target import Fleet, Load, Staffing, WaitTarget, staff

__all__ = [
    "Decision",
    "Direction",
    "Observation",
    "ReadFailure",
    "Reason",
    "Recommendation",
    "ScaleEvent",
    "TierHistory",
    "TierObservation",
    "TierWorkers",
    "decide",
    "observe_tier",
    "with_desired",
]


# -- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the broker says about one tier's queues (summed over them and their priority lists)."""

    queue_depth: int
    in_flight: int = 0
    # False when the in-flight count was extrapolated from a sample of a very large unacked hash.
    in_flight_exact: bool = True
    # Unacked entries older than the broker's visibility timeout (kombu restores them to the queue;
    # no live worker holds them): reported, not in `in_flight`, not demand.
    stale_unacked: int = 0
    # For a wait target (all optional): seconds since delivery of each in-flight entry (kombu's
    # unacked_index: delivery tag -> age), the pods consuming now, start-ups (created -> consuming,
    # seconds) measured elsewhere since the last poll, and the oldest waiting message's age (no poll
    # reads it yet: the backlog rule then takes the queued messages as fresh).
    # Not compared: ages move every poll, and a poll whose counts did not change is skipped as before.
    in_flight_ages: Mapping[str, float] | None = field(default=None, compare=False)
    ready_replicas: int | None = None
    startups: tuple[float, ...] = ()
    oldest_age: float | None = None


@dataclass(frozen=True)
class ReadFailure:
    """The broker could not be read; ``kind`` is a short CamelCase class such as ``Timeout``."""

    kind: str
    message: str


TierObservation = Observation | ReadFailure


def observe_tier(
    queues: Sequence[str],
    queue_depths: Mapping[str, int],
    in_flight: Mapping[str, int],
    *,
    in_flight_exact: bool = True,
) -> Observation:
    """Sum per-queue readings into one tier observation (a queue nobody has declared yet is empty)."""
    unique = dict.fromkeys(queues)
    return Observation(
        queue_depth=sum(queue_depths.get(q, 0) for q in unique),
        in_flight=sum(in_flight.get(q, 0) for q in unique),
        in_flight_exact=in_flight_exact,
    )


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int


@dataclass(frozen=True)
class ScaleEvent:
    at: float
    from_replicas: int
    to_replicas: int


@dataclass(frozen=True)
class TierHistory:
    """What one tier's decisions need to remember between polls; the caller stores it as is."""

    recommendations: tuple[Recommendation, ...] = ()
    scale_events: tuple[ScaleEvent, ...] = ()
    # First time the queue was seen empty with nothing in flight, in the current idle stretch.
    idle_since: float | None = None
    last_scale_time: float | None = None
    last_scale_reason: str | None = None
    # The wait target's estimates (arrival rate, run times, start-up), when the tier has one.
    wait: WaitEstimates | None = None


# -- outputs --------------------------------------------------------------------------------------------


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


class Reason(StrEnum):
    """Why a tier has its desired replica count; goes to status, Events, logs and metrics unchanged."""

    QUEUE_BACKLOG = "QueueBacklog"  # scaled up to follow demand
    WAIT_TARGET = "WaitTarget"  # scaled up to meet targetWaitSeconds
    QUEUE_DRAINED = "QueueDrained"  # scaled down to follow demand
    STEADY = "Steady"  # the recommendation is the current count
    ACTIVATION = "Activation"  # 0 -> n: demand crossed activationDepth
    BELOW_ACTIVATION = "BelowActivation"  # stays at 0: demand does not exceed activationDepth
    COOLDOWN = "Cooldown"  # stays at 1+ until idle for cooldownSeconds
    IDLE = "Idle"  # scaled to 0 after the cooldown
    STABILIZATION_WINDOW = "StabilizationWindow"  # a higher recommendation is still in the window
    SCALE_UP_LIMITED = "ScaleUpLimited"  # scaleUpMaxStep used up for this period
    SCALE_DOWN_LIMITED = "ScaleDownLimited"  # scaleDownMaxStep used up for this period
    AT_MAXIMUM = "AtMaximum"  # demand wants more than replicas.max
    ABOVE_MAXIMUM = "AboveMaximum"  # was above replicas.max (spec lowered): brought to max
    BELOW_MINIMUM = "BelowMinimum"  # was below replicas.min: brought to min
    BUDGET_LIMITED = "BudgetLimited"  # maxTotalReplicas left this tier less than it wants
    BROKER_UNREACHABLE = "BrokerUnreachable"  # queue depth unknown: held
    FALLBACK_REPLICAS = "FallbackReplicas"  # queue depth unknown: raised to fallbackReplicas
    PAUSED = "Paused"  # the pool is paused: held
    BUSY_WORKERS = "BusyWorkers"  # scale-in stopped at the workers that run or hold tasks
    IN_FLIGHT_APPROXIMATE = "InFlightApproximate"  # stays at 1: the in-flight count was extrapolated


# Reasons that keep a tier from its own recommendation (the HPA's ScalingLimited): status.tiers[].limitedBy.
LIMITING = frozenset({
    Reason.BELOW_ACTIVATION, Reason.COOLDOWN, Reason.STABILIZATION_WINDOW, Reason.SCALE_UP_LIMITED,
    Reason.SCALE_DOWN_LIMITED, Reason.AT_MAXIMUM, Reason.ABOVE_MAXIMUM, Reason.BELOW_MINIMUM,
    Reason.BUDGET_LIMITED, Reason.BROKER_UNREACHABLE, Reason.FALLBACK_REPLICAS, Reason.PAUSED,
    Reason.BUSY_WORKERS, Reason.IN_FLIGHT_APPROXIMATE,
})  # fmt: skip


@dataclass(frozen=True)
class Decision:
    tier: str
    current: int | None  # None: the tier has no Deployment yet
    desired: int
    direction: Direction
    reason: Reason
    message: str
    history: TierHistory
    queue_depth: int | None = None  # None when the read failed
    in_flight: int | None = None
    # The tier's own recommendation before stabilization, step limits and the budget.
    recommended: int | None = None
    # From the workers' answers (None when they were not asked for this decision).
    scheduled: int | None = None
    busy_workers: int | None = None
    stale_unacked: int | None = None  # None when the read failed
    # In flight but held by no live worker (a census covering every live worker); None: not known.
    orphaned: int | None = None
    # The caller should ask the tier's workers and decide again: this decision lowers the tier, or
    # raises it or holds it above the queue's need on in-flight work that may be scheduled (ETA) tasks.
    asks_workers: bool = False
    # targetWaitSeconds: the predicted wait percentile at ``desired`` (steady-state model); None: no target.
    predicted_wait: float | None = None

    @property
    def changed(self) -> bool:
        return self.current != self.desired


# -- the decision ---------------------------------------------------------------------------------------


@dataclass
class _Proposal:
    """One tier's wish before the pool budget is applied."""

    spec: Tier
    base: int  # current replicas, or min when there is no Deployment yet
    current: int | None
    desired: int
    reason: Reason
    detail: str  # why, appended to the message
    floor: int  # the budget never takes the tier below this
    history: TierHistory
    observation: TierObservation
    recommended: int | None = None
    facts: str = ""  # "540 queued + 12 in flight, target 100 per replica"
    budget_wanted: int | None = None
    workers: TierWorkers | None = None
    in_flight_driven: bool = False  # the recommendation exceeds what the queue alone asks for
    queue_only: int = 0  # what the queue alone asks for, within the bounds
    orphaned: int | None = None  # in flight but held by no live worker (a census covering the tier)
    staffing: Staffing | None = None  # targetWaitSeconds: what the wait policy asked for


def decide(
    tiers: Sequence[Tier],
    observations: Mapping[str, TierObservation],
    current: Mapping[str, int | None],
    histories: Mapping[str, TierHistory],
    *,
    now: float,
    max_total_replicas: int | None = None,
    paused: bool = False,
    workers: Mapping[str, TierWorkers] | None = None,
) -> tuple[Decision, ...]:
    """Decide the desired replicas of every tier of one pool; see the module docstring for the rules.

    ``observations`` must have an entry for every tier (a missing one is treated as a read failure);
    ``current`` and ``histories`` may lack tiers (no Deployment yet, first poll); ``workers`` holds
    the answers of the tiers whose workers were asked for this decision.
    """
    workers = workers or {}
    if paused:
        return tuple(_paused(t, current.get(t.name), histories.get(t.name, TierHistory())) for t in tiers)

    proposals = [
        _propose(
            t,
            observations.get(t.name, ReadFailure("Missing", "no observation for this tier")),
            current.get(t.name),
            histories.get(t.name, TierHistory()),
            now,
            workers.get(t.name),
        )
        for t in tiers
    ]
    if max_total_replicas is not None:
        _apply_budget(proposals, max_total_replicas)
    for p in proposals:
        _keep_busy(p)
    return tuple(_finish(p, now) for p in proposals)


def _paused(tier: Tier, current: int | None, history: TierHistory) -> Decision:
    held = current if current is not None else tier.replicas.min
    # Forget the window: after the pause, scale-down waits a full window of fresh observations.
    return Decision(
        tier=tier.name,
        current=current,
        desired=held,
        direction=_direction(current if current is not None else 0, held),
        reason=Reason.PAUSED,
        message=f"Tier {tier.name} holds {held}: the pool is paused",
        history=replace(history, recommendations=(), scale_events=(), idle_since=None),
    )


def _clamp(value: int, tier: Tier) -> int:
    return max(tier.replicas.min, min(tier.replicas.max, value))


def _propose(
    tier: Tier,
    obs: TierObservation,
    current: int | None,
    history: TierHistory,
    now: float,
    workers: TierWorkers | None = None,
) -> _Proposal:
    a = tier.autoscaling
    lo, hi = tier.replicas.min, tier.replicas.max
    base = current if current is not None else lo

    if isinstance(obs, ReadFailure):
        return _propose_on_failure(tier, obs, current, base, history, now)

    # ETA / countdown tasks sit in `unacked` until due: scheduled work, not current demand.
    scheduled = min(workers.scheduled, obs.in_flight) if workers is not None else 0
    in_flight = obs.in_flight - scheduled
    hostage = orphaned = 0
    if workers is not None:
        # Reserved behind a running task (early ack, default prefetch): only that worker can run it.
        hostage = min(workers.hostage, in_flight)
        in_flight -= hostage
        if workers.covered and obs.in_flight_exact:
            # Every live worker answered: what none of them holds is a dead worker's (SIGKILL, OOM).
            orphaned = max(0, obs.in_flight - workers.held)
            orphaned = min(orphaned, in_flight)
            in_flight -= orphaned
    counted_in_flight = in_flight if a.count_in_flight else 0
    demand = obs.queue_depth + counted_in_flight
    wanted = math.ceil(demand / a.target_depth_per_replica)
    staffing, estimates = _wait_staffing(tier, obs, in_flight, history, base, now)
    if staffing is not None:
        wanted = staffing.pods  # the wait policy replaces the depth rule once run times are measured
    recommended = _clamp(wanted, tier)
    if lo == 0 and base == 0 and demand <= a.activation_depth:
        recommended = 0
    # Entries past the visibility timeout are nobody's work, but kombu puts them back on their
    # queues only from a live consumer of the broker: they ask for one worker, never more.
    restorer = (obs.stale_unacked > 0 or orphaned > 0) and recommended == 0 and hi > 0
    if restorer:
        recommended = 1

    idle = obs.queue_depth == 0 and in_flight == 0 and not restorer and (workers is None or not workers.busy)
    idle_since = (history.idle_since if history.idle_since is not None else now) if idle else None

    window = _window(a, staffing)
    recs = history.recommendations
    if not recs and window > 0:
        recs = (Recommendation(now, base),)  # fresh history: the window starts from what runs now
    recs = (*_within(recs, now, window), Recommendation(now, recommended))
    new_history = replace(history, recommendations=recs, idle_since=idle_since, wait=estimates)

    p = _Proposal(
        spec=tier,
        base=base,
        current=current,
        desired=base,
        reason=Reason.STEADY,
        detail="",
        floor=lo,
        history=new_history,
        observation=obs,
        recommended=recommended,
        facts=_facts(
            obs,
            a.count_in_flight,
            a.target_depth_per_replica,
            scheduled if workers is not None else None,
            hostage,
            orphaned,
        ),
        workers=workers,
        queue_only=_clamp(math.ceil(obs.queue_depth / a.target_depth_per_replica), tier),
        staffing=staffing,
    )
    if staffing is not None:
        p.facts = f"{obs.queue_depth} queued + {obs.in_flight} in flight; {staffing.message}"
        p.queue_only = recommended  # the policy already weighs what is in flight
    p.in_flight_driven = counted_in_flight > 0 and p.queue_only < recommended
    p.orphaned = orphaned if workers is not None and workers.covered and obs.in_flight_exact else None

    if base > hi:
        p.desired, p.reason, p.detail = hi, Reason.ABOVE_MAXIMUM, f"above replicas.max {hi}"
        return p
    if base < lo:
        p.desired, p.reason, p.detail = lo, Reason.BELOW_MINIMUM, f"below replicas.min {lo}"
        return p

    if recommended > base:
        _scale_up(p, recommended, now, wanted)
        if staffing is not None and p.reason is Reason.QUEUE_BACKLOG:
            p.reason = Reason.WAIT_TARGET
        if restorer and obs.stale_unacked:
            p.detail = f"one worker for kombu to restore {obs.stale_unacked} message(s) past the visibility timeout"
        elif restorer:
            p.detail = f"one worker for kombu to restore {orphaned} orphaned message(s) when their visibility ends"
    elif recommended < base:
        _scale_down(p, recs, now, idle_since)
    elif lo == 0 and base == 0 and demand > 0:
        p.reason = Reason.BELOW_ACTIVATION
        p.detail = f"demand {demand} does not exceed activationDepth {a.activation_depth}"
    elif wanted > hi and base == hi:
        p.reason, p.detail = Reason.AT_MAXIMUM, f"wants {wanted}, replicas.max is {hi}"
    return p


def _propose_on_failure(
    tier: Tier, obs: ReadFailure, current: int | None, base: int, history: TierHistory, now: float
) -> _Proposal:
    a = tier.autoscaling
    lo, hi = tier.replicas.min, tier.replicas.max
    desired, reason = base, Reason.BROKER_UNREACHABLE
    # The message comes from a broker adapter: never a URL in it (it may hold a password), whatever the adapter did.
    detail = f"queue depth unknown, broker read failed ({obs.kind}: {redact_urls(obs.message)})"
    if a.fallback_replicas is not None and _clamp(a.fallback_replicas, tier) > base:
        desired, reason = _clamp(a.fallback_replicas, tier), Reason.FALLBACK_REPLICAS
        detail += f"; raised to fallbackReplicas {a.fallback_replicas}"
    if desired > hi:
        desired, reason = hi, Reason.ABOVE_MAXIMUM
        detail += f"; above replicas.max {hi}"
    elif desired < lo:
        desired, reason = lo, Reason.BELOW_MINIMUM
        detail += f"; below replicas.min {lo}"
    # The held count enters the window, so the first good read after an outage cannot shrink the tier.
    window = a.scale_down_stabilization_seconds
    recs = (*_within(history.recommendations, now, window), Recommendation(now, desired))
    return _Proposal(
        spec=tier,
        base=base,
        current=current,
        desired=desired,
        reason=reason,
        detail=detail,
        floor=desired,
        history=replace(history, recommendations=recs, idle_since=None),
        observation=obs,
    )


def _scale_up(p: _Proposal, recommended: int, now: float, wanted: int) -> None:
    a = p.spec.autoscaling
    target = recommended
    if a.scale_up_max_step is not None:
        added = sum(
            max(0, e.to_replicas - e.from_replicas)
            for e in p.history.scale_events
            if e.at > now - a.scale_up_period_seconds
        )
        allowed = max(0, a.scale_up_max_step - added)
        target = min(recommended, p.base + allowed)
        if target == p.base:
            p.reason = Reason.SCALE_UP_LIMITED
            p.detail = (
                f"wants {recommended}, scaleUpMaxStep {a.scale_up_max_step} per "
                f"{a.scale_up_period_seconds}s already used"
            )
            return
    p.desired = target
    p.reason = Reason.ACTIVATION if p.base == 0 else Reason.QUEUE_BACKLOG
    notes = []
    if target < recommended:
        notes.append(f"heading to {recommended}, at most {a.scale_up_max_step} per {a.scale_up_period_seconds}s")
    if wanted > p.spec.replicas.max:
        notes.append(f"wants {wanted}, replicas.max is {p.spec.replicas.max}")
    if p.base == 0:
        notes.append(f"demand above activationDepth {a.activation_depth}")
    p.detail = "; ".join(notes)


def _scale_down_allowance(a: Autoscaling, replicas: int, removed: int) -> int:
    """Replicas that may still go this period: ``replicas`` now, ``removed`` already gone in it."""
    if a.scale_down_max_step is not None:
        limit = a.scale_down_max_step
    else:  # the HPA's Percent policy: of the replicas at the period's start, rounded up
        limit = max(1, math.ceil((replicas + removed) * a.scale_down_max_percent / 100))
    return max(0, limit - removed)


def _scale_down_limit(a: Autoscaling, *, short: bool = False) -> str:
    if a.scale_down_max_step is not None:
        return str(a.scale_down_max_step) if short else f"scaleDownMaxStep {a.scale_down_max_step}"
    return f"{a.scale_down_max_percent}%" if short else f"scaleDownMaxPercent {a.scale_down_max_percent}%"


def _scale_down(p: _Proposal, recs: tuple[Recommendation, ...], now: float, idle_since: float | None) -> None:
    a = p.spec.autoscaling
    window = _window(a, p.staffing)
    stabilized = _clamp(max(r.replicas for r in recs), p.spec)
    if stabilized >= p.base:
        p.reason = Reason.STABILIZATION_WINDOW
        p.detail = (
            f"recommends {p.recommended}, but {stabilized} was recommended within the "
            f"{window:g}s scale-down stabilization window"
        )
        if p.staffing is not None:
            p.detail += " (the wait target's delayed turn-off: idle pods are held one measured start-up)"
        return
    removed = sum(
        max(0, e.from_replicas - e.to_replicas)
        for e in p.history.scale_events
        if e.at > now - a.scale_down_period_seconds
    )
    allowed = _scale_down_allowance(a, p.base, removed)
    target = max(stabilized, p.base - allowed)
    obs = p.observation
    if target == 0 and isinstance(obs, Observation) and not obs.in_flight_exact and obs.in_flight > 0:
        # An extrapolated count may be wrong either way; 1 -> 0 would stop a tier that has work.
        target = 1
        if p.base == 1:
            p.reason = Reason.IN_FLIGHT_APPROXIMATE
            p.detail = "the in-flight count is extrapolated from a sample; a tier never goes 1 -> 0 on it"
            return
    if target == 0:
        idle_for = 0.0 if idle_since is None else now - idle_since
        if idle_for < a.cooldown_seconds:
            target = 1
            if p.base == 1:
                p.reason = Reason.COOLDOWN
                p.detail = f"idle for {idle_for:g}s of the {a.cooldown_seconds}s cooldown before scaling to 0"
                return
    if target == p.base:
        p.reason = Reason.SCALE_DOWN_LIMITED
        p.detail = f"recommends {stabilized}, {_scale_down_limit(a)} per {a.scale_down_period_seconds}s already used"
        return
    p.desired = target
    if target == 0:
        p.reason = Reason.IDLE
        p.detail = f"idle for the {a.cooldown_seconds}s cooldown"
    else:
        p.reason = Reason.QUEUE_DRAINED
        if target > stabilized:
            step = _scale_down_limit(a, short=True)
            p.detail = f"heading to {stabilized}, at most {step} per {a.scale_down_period_seconds}s"


def _apply_budget(proposals: list[_Proposal], budget: int) -> None:
    if sum(p.desired for p in proposals) <= budget:
        return
    # Every tier first gets its floor (min, or what a failed tier holds); then higher tiers first.
    floors = sum(p.floor for p in proposals)
    left = max(0, budget - floors)
    cut: list[_Proposal] = []
    for p in proposals:
        extra = min(max(0, p.desired - p.floor), left)
        left -= extra
        if p.floor + extra < p.desired:
            p.budget_wanted = p.desired
            p.desired = p.floor + extra
            cut.append(p)
    total = sum(p.desired for p in proposals)
    for p in cut:
        p.reason = Reason.BUDGET_LIMITED
        p.detail = (
            f"wants {p.budget_wanted}, maxTotalReplicas {budget} leaves it {p.desired}"
            f" ({total - p.desired} go to the other tiers)"
        )
        if floors > budget:
            p.detail += f"; the tiers' minimums alone need {floors}"


def _keep_busy(p: _Proposal) -> None:
    """Never below the workers that run or hold tasks (see the module docstring)."""
    census = p.workers
    # Above replicas.max the user's own bound wins (removed workers still get their warm shutdown).
    if census is None or p.desired >= p.base or p.reason is Reason.ABOVE_MAXIMUM:
        return
    # ETA holders count as busy: removing one requeues its tasks (the tier would start pods again for
    # them) and forgets the revokes it got; so a tier never goes to 0 while they are held.
    busy = len(census.holding)
    if p.desired >= busy:
        if busy:
            # Demand alone keeps them; still say so, so every scale-in names what it kept.
            note = census.summary()
            p.detail = f"{p.detail}; {note}" if p.detail else note
        return
    if p.spec.autoscaling.scale_in_busy_workers is BusyWorkers.REMOVE:
        note = f"removes {busy - p.desired} busy worker(s): scaleInBusyWorkers is Remove"
        p.detail = f"{p.detail}; {note}" if p.detail else note
        return
    kept = min(p.base, busy)
    wanted = p.desired
    p.desired = kept
    note = f"{census.summary()}, wants {wanted}"
    if p.reason is Reason.BUDGET_LIMITED:
        # The budget never removes busy workers silently: the tier stays over its share until they finish.
        p.detail = f"{p.detail}; {note} (over the budget until they finish)"
    else:
        p.detail = note
    p.reason = Reason.BUSY_WORKERS


def _finish(p: _Proposal, now: float) -> Decision:
    # A tier without a Deployment yet scales from 0; that start counts towards scaleUpMaxStep.
    start = p.current if p.current is not None else 0
    events = _within_events(p.history.scale_events, now, p.spec)
    history = replace(p.history, scale_events=events)
    if p.desired != start:
        history = replace(
            history,
            scale_events=(*events, ScaleEvent(now, start, p.desired)),
            last_scale_time=now,
            last_scale_reason=p.reason.value,
        )
    direction = _direction(start, p.desired)

    name = p.spec.name
    if p.current is None:
        head = f"Created tier {name} at {p.desired}"
    elif p.desired != p.current:
        head = f"Scaled tier {name} {p.current} -> {p.desired}"
    else:
        head = f"Tier {name} holds {p.desired}"
    body = p.facts
    if p.detail:
        body = f"{body}; {p.detail}" if body else p.detail
    message = f"{head}: {body}" if body else head

    obs = p.observation
    return Decision(
        tier=name,
        current=p.current,
        desired=p.desired,
        direction=direction,
        reason=p.reason,
        message=message,
        history=history,
        queue_depth=obs.queue_depth if isinstance(obs, Observation) else None,
        in_flight=obs.in_flight if isinstance(obs, Observation) else None,
        recommended=p.recommended,
        scheduled=p.workers.scheduled if p.workers is not None else None,
        busy_workers=len(p.workers.busy) if p.workers is not None else None,
        stale_unacked=obs.stale_unacked if isinstance(obs, Observation) else None,
        orphaned=p.orphaned,
        predicted_wait=p.staffing.predicted_wait if p.staffing is not None else None,
        asks_workers=p.workers is None
        and p.current is not None
        and isinstance(obs, Observation)
        # Lowering; or raising, or holding above what the queue alone needs, on in-flight work: that may
        # be ETA tasks the workers hold until due (a tier raised on a backlog its workers then reserved
        # would otherwise hold at that count for as long as they hold them).
        and (
            p.desired < p.current
            or (p.in_flight_driven and p.desired >= p.current > p.queue_only)
            or (p.desired > p.current and p.in_flight_driven)
        ),
    )


def _direction(current: int, desired: int) -> Direction:
    if desired > current:
        return Direction.UP
    if desired < current:
        return Direction.DOWN
    return Direction.HOLD


def _facts(
    obs: Observation, count_in_flight: bool, target: int, scheduled: int | None = None, hostage: int = 0,
    orphaned: int = 0,
) -> str:  # fmt: skip
    approx = "" if obs.in_flight_exact else "~"
    flight = f"{approx}{obs.in_flight} in flight"
    aside = [f"{n} {what}" for n, what in ((scheduled or 0, "scheduled"), (hostage, "reserved behind running tasks"),
                                           (orphaned, "orphaned: held by no live worker")) if n]  # fmt: skip
    if aside:
        rest = obs.in_flight - (scheduled or 0) - hostage - orphaned
        flight = f"{approx}{rest} in flight ({', '.join(aside)}, not demand)"
    if obs.stale_unacked:
        flight += f" ({obs.stale_unacked} past the visibility timeout, not in flight)"
    if count_in_flight:
        return f"{obs.queue_depth} queued + {flight}, target {target} per replica"
    return f"{obs.queue_depth} queued ({flight}, not counted), target {target} per replica"


def _within(recs: tuple[Recommendation, ...], now: float, window: float) -> tuple[Recommendation, ...]:
    return tuple(r for r in recs if r.at > now - window)


def _within_events(events: tuple[ScaleEvent, ...], now: float, tier: Tier) -> tuple[ScaleEvent, ...]:
    a = tier.autoscaling
    keep = max(a.scale_up_period_seconds, a.scale_down_period_seconds)
    return tuple(e for e in events if e.at > now - keep)


def with_desired(d: Decision, desired: int, note: str) -> Decision:
    """``d`` as far as it could go: the scale-in protocol removed fewer pods than decided (drained
    candidates took work during the census). Its history records the scale that is written."""
    if desired == d.desired:
        return d
    start = d.current if d.current is not None else 0
    events = tuple(e for e in d.history.scale_events if not (e.from_replicas == start and e.to_replicas == d.desired))
    history = replace(d.history, scale_events=events)
    if desired != start and d.history.last_scale_time is not None:
        history = replace(history, scale_events=(*events, ScaleEvent(d.history.last_scale_time, start, desired)))
    head = f"Scaled tier {d.tier} {start} -> {desired}" if desired != start else f"Tier {d.tier} holds {desired}"
    body = d.message.split(": ", 1)[1] if ": " in d.message else ""
    message = f"{head}: {body}; {note}" if body else f"{head}: {note}"
    return replace(d, desired=desired, direction=_direction(start, desired), message=message, history=history)


# Before any start-up was measured (the warm pods at replicas.min give none): a typical 10-30 s.
DEFAULT_STARTUP = 20.0


def _window(a: Autoscaling, staffing: Staffing | None) -> float:
    """The scale-down window. With a wait target it is the policy's delayed turn-off (hold idle pods
    one start-up), the default window left out (the simulation: 0.66x instead of 0.72x KEDA + HPA's
    worker-seconds on poisson-bursts-high); a scaleDownStabilizationSeconds the user set still wins
    when longer."""
    if staffing is None:
        return float(a.scale_down_stabilization_seconds)
    explicit = a.scale_down_stabilization_seconds if "scale_down_stabilization_seconds" in a.model_fields_set else 0
    return max(float(explicit), staffing.hold_seconds)


def _wait_staffing(
    tier: Tier, obs: Observation, in_flight: int, history: TierHistory, base: int, now: float
) -> tuple[Staffing | None, WaitEstimates | None]:
    """targetWaitSeconds: advance the estimates and staff; (None, ...) while run times are unknown."""
    a = tier.autoscaling
    if a.target_wait_seconds is None:
        return None, None
    est = (history.wait or WaitEstimates()).observe(
        now, obs.queue_depth, obs.in_flight, obs.in_flight_ages, obs.startups,
        replicas=base, ready=obs.ready_replicas,
    )  # fmt: skip
    if not est.service.known or not est.arrivals.known:
        return None, est
    load = Load(
        rate=est.arrivals.rate,
        service_mean=est.service.mean,
        service_scv=est.service.scv,
        arrival_scv=est.arrivals.ca2,
        startup=est.startup.mean if est.startup.known else DEFAULT_STARTUP,
    )
    ready = obs.ready_replicas if obs.ready_replicas is not None else base
    fleet = Fleet(tier.concurrency, ready, obs.queue_depth, in_flight, obs.oldest_age, tier.replicas.max)
    return staff(WaitTarget(a.target_wait_seconds, a.target_wait_percentile), load, fleet), est
