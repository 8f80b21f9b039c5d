"""A model of KEDA's Redis Lists scaler driving a HorizontalPodAutoscaler, at their defaults.

Read from the sources (not copied): KEDA ``pkg/scalers/redis_scaler.go`` (metric = LLEN of
ONE ``listName``; target type AverageValue = ``listLength``; active when the length exceeds
``activationListLength``, default 0), ``pkg/scaling/scale_handler.go`` (the HPA's metric request
asks the scaler afresh unless the trigger sets ``useCachedMetrics``), ``pkg/scaling/executor/
scale_scaledobjects.go`` (every ``pollingInterval``, 30 s: 0 -> max(1, min) on activity, -> 0
after ``cooldownPeriod``, 300 s, of inactivity when minReplicaCount is 0), ``controllers/keda/
hpa.go`` (``behavior`` stays nil unless the ScaledObject sets one); Kubernetes ``pkg/controller/
podautoscaler/horizontal.go`` and ``replica_calculator.go`` (sync every 15 s; external
AverageValue: ratio = usage / (target * status.replicas), keep the count within the 0.1
tolerance, else ceil(usage / target); with a nil behavior, the highest recommendation of the last
300 s and at most max(2 * current, 4) replicas per sync; with the API's default behavior, the
lowest recommendation of a 0 s up-window / highest of the 300 s down-window and scale-up by
max(4 pods, 100 %) per 15 s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .view import FleetView

__all__ = [
    "HorizontalPodAutoscaler",
    "HpaBehavior",
    "HpaPolicy",
    "KedaHpaConfig",
    "KedaHpaScaler",
    "KedaRedisListsTrigger",
]


@dataclass(frozen=True)
class HpaPolicy:
    type: Literal["Pods", "Percent"]
    value: int
    period_seconds: int


@dataclass(frozen=True)
class HpaRules:
    stabilization_seconds: float
    policies: tuple[HpaPolicy, ...]
    select: Literal["Max", "Min", "Disabled"] = "Max"


@dataclass(frozen=True)
class HpaBehavior:
    """``spec.behavior`` as the autoscaling/v2 API defaults it once any part of it is set."""

    scale_up: HpaRules = field(
        default_factory=lambda: HpaRules(0, (HpaPolicy("Pods", 4, 15), HpaPolicy("Percent", 100, 15)))
    )
    # The down window defaults to the controller's --horizontal-pod-autoscaler-downscale-stabilization.
    scale_down: HpaRules = field(default_factory=lambda: HpaRules(300, (HpaPolicy("Percent", 100, 15),)))


@dataclass
class _Stamped:
    at: float
    value: int


class HorizontalPodAutoscaler:
    """One HPA with a single External metric of target type AverageValue.

    ``reconcile`` is one sync of ``reconcileAutoscaler``: it returns the replica count the HPA
    writes to the scale subresource (``spec_replicas`` when it does not rescale).
    """

    def __init__(
        self,
        *,
        min_replicas: int,
        max_replicas: int,
        target_average_value: int,
        tolerance: float = 0.1,
        downscale_stabilization: float = 300.0,
        behavior: HpaBehavior | None = None,
    ) -> None:
        if target_average_value <= 0:
            raise ValueError("target_average_value must be > 0")
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.target = target_average_value
        self.tolerance = tolerance
        self.downscale_stabilization = downscale_stabilization
        self.behavior = behavior
        self.recommendations: list[_Stamped] = []
        self.scale_up_events: list[_Stamped] = []
        self.scale_down_events: list[_Stamped] = []
        self.last_reason = ""

    # -- replica_calculator.go: GetExternalPerPodMetricReplicas -----------------------------------

    def metric_replicas(self, usage: float, status_replicas: int) -> int:
        if status_replicas <= 0:
            return math.ceil(usage / self.target)
        ratio = usage / (self.target * status_replicas)
        if abs(1.0 - ratio) > self.tolerance:
            return math.ceil(usage / self.target)
        return status_replicas

    # -- horizontal.go: reconcileAutoscaler --------------------------------------------------------

    def reconcile(self, now: float, *, spec_replicas: int, status_replicas: int, usage: float) -> int:
        current = spec_replicas
        if not self.recommendations:
            self.recommendations.append(_Stamped(now, current))  # recordInitialRecommendation
        if current == 0 and self.min_replicas != 0:
            self.last_reason = "ScalingDisabled"
            return 0
        if current > self.max_replicas:
            desired, self.last_reason = self.max_replicas, "AboveMax"
        elif current < self.min_replicas:
            desired, self.last_reason = self.min_replicas, "BelowMin"
        else:
            desired = max(0, self.metric_replicas(usage, status_replicas))
            self.last_reason = "Metric"
            if self.behavior is None:
                desired = self._normalize(now, current, desired)
            else:
                desired = self._normalize_with_behavior(now, current, desired, self.behavior)
        if desired != current:
            self._store_scale_event(now, current, desired)
        return desired

    def _normalize(self, now: float, current: int, proposed: int) -> int:
        # stabilizeRecommendation: the highest recommendation not older than the window.
        cutoff = now - self.downscale_stabilization
        stabilized = max([proposed, *(r.value for r in self.recommendations if r.at >= cutoff)])
        self.recommendations = [r for r in self.recommendations if r.at >= cutoff]
        self.recommendations.append(_Stamped(now, proposed))
        # convertDesiredReplicasWithRules: scaleUpLimit = max(2 * current, 4), per sync.
        up_limit = max(2 * current, 4)
        highest = min(self.max_replicas, up_limit)
        if stabilized < self.min_replicas:
            self.last_reason = "TooFewReplicas"
            return self.min_replicas
        if stabilized > highest:
            self.last_reason = "ScaleUpLimit" if highest == up_limit else "TooManyReplicas"
            return highest
        if stabilized != proposed:
            self.last_reason = "ScaleDownStabilized"
        return stabilized

    def _normalize_with_behavior(self, now: float, current: int, proposed: int, b: HpaBehavior) -> int:
        # stabilizeRecommendationWithBehaviors
        if proposed >= current:
            window, better = b.scale_up.stabilization_seconds, min
        else:
            window, better = b.scale_down.stabilization_seconds, max
        longest = max(b.scale_up.stabilization_seconds, b.scale_down.stabilization_seconds)
        stabilized = proposed
        for r in self.recommendations:
            if r.at > now - window:
                stabilized = better(r.value, stabilized)
        self.recommendations = [r for r in self.recommendations if r.at >= now - longest]
        self.recommendations.append(_Stamped(now, proposed))
        # convertDesiredReplicasWithBehaviorRate
        if stabilized > current:
            limit = self._scale_up_limit(now, current, b.scale_up)
            allowed = min(self.max_replicas, max(limit, current))
            if stabilized > allowed:
                self.last_reason = "ScaleUpLimit" if allowed < self.max_replicas else "TooManyReplicas"
                return allowed
        elif stabilized < current:
            limit = self._scale_down_limit(now, current, b.scale_down)
            allowed = max(self.min_replicas, min(limit, current))
            if stabilized < allowed:
                self.last_reason = "ScaleDownLimit" if allowed > self.min_replicas else "TooFewReplicas"
                return allowed
        return stabilized

    @staticmethod
    def _changed_within(events: list[_Stamped], now: float, period: float) -> int:
        return sum(e.value for e in events if e.at > now - period)

    def _scale_up_limit(self, now: float, current: int, rules: HpaRules) -> int:
        if rules.select == "Disabled":
            return current
        pick = min if rules.select == "Min" else max
        result: int | None = None
        for p in rules.policies:
            start = current - self._changed_within(self.scale_up_events, now, p.period_seconds)
            proposed = start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100))
            result = proposed if result is None else pick(result, proposed)
        return current if result is None else result

    def _scale_down_limit(self, now: float, current: int, rules: HpaRules) -> int:
        if rules.select == "Disabled":
            return current
        pick = max if rules.select == "Min" else min
        result: int | None = None
        for p in rules.policies:
            start = current + self._changed_within(self.scale_down_events, now, p.period_seconds)
            proposed = start - p.value if p.type == "Pods" else int(start * (1 - p.value / 100))
            result = proposed if result is None else pick(result, proposed)
        return current if result is None else result

    def _store_scale_event(self, now: float, before: int, after: int) -> None:
        if self.behavior is None:
            return  # only the behavior path reads past scale events
        if after > before:
            longest = max(p.period_seconds for p in self.behavior.scale_up.policies)
            self.scale_up_events = [e for e in self.scale_up_events if e.at >= now - longest]
            self.scale_up_events.append(_Stamped(now, after - before))
        else:
            longest = max(p.period_seconds for p in self.behavior.scale_down.policies)
            self.scale_down_events = [e for e in self.scale_down_events if e.at >= now - longest]
            self.scale_down_events.append(_Stamped(now, before - after))


@dataclass(frozen=True)
class KedaRedisListsTrigger:
    """``type: redis`` trigger metadata: one ``listName``, ``listLength`` per replica."""

    list_name: str
    list_length: int = 5
    activation_list_length: int = 0

    def read(self, list_lengths: Mapping[str, int]) -> tuple[int, bool]:
        """(metric value, active): LLEN of the one named list, as the scaler's script returns it."""
        length = list_lengths.get(self.list_name, 0)
        return length, length > self.activation_list_length


@dataclass(frozen=True)
class KedaHpaConfig:
    trigger: KedaRedisListsTrigger
    min_replica_count: int
    max_replica_count: int
    polling_interval: float = 30.0
    cooldown_period: float = 300.0
    use_cached_metrics: bool = False
    hpa_sync_period: float = 15.0
    tolerance: float = 0.1
    downscale_stabilization: float = 300.0
    behavior: HpaBehavior | None = None  # KEDA leaves spec.behavior nil unless advanced.* sets it
    keda_phase: float = 0.0  # first KEDA poll, seconds after t=0
    hpa_phase: float = 0.0  # first HPA sync, seconds after t=0


class KedaHpaScaler:
    """KEDA's operator loop plus the HPA it creates, both acting on the same Deployment."""

    def __init__(self, config: KedaHpaConfig, name: str = "KEDA+HPA") -> None:
        self.name = name
        self.config = config
        # KEDA gives the HPA minReplicas = max(1, minReplicaCount) (GetHPAMinReplicas).
        self.hpa = HorizontalPodAutoscaler(
            min_replicas=max(1, config.min_replica_count),
            max_replicas=config.max_replica_count,
            target_average_value=config.trigger.list_length,
            tolerance=config.tolerance,
            downscale_stabilization=config.downscale_stabilization,
            behavior=config.behavior,
        )
        self._next_poll = config.keda_phase
        self._next_sync = config.hpa_phase
        self._cached: int | None = None
        self._last_active: float | None = None

    def due(self) -> float:
        return min(self._next_poll, self._next_sync)

    def tick(self, now: float, view: FleetView) -> int | None:
        """Run whichever loop is due at ``now``; the replica count to write, or None to leave it."""
        c = self.config
        desired: int | None = None
        current = view.spec_replicas
        if now >= self._next_poll:
            self._next_poll += c.polling_interval
            value, active = c.trigger.read(view.list_lengths)
            if c.use_cached_metrics:
                self._cached = value
            desired = self._keda_scale(now, active, current)
            if desired is not None:
                current = desired
        if now >= self._next_sync:
            self._next_sync += c.hpa_sync_period
            usage = self._cached if c.use_cached_metrics and self._cached is not None else None
            if usage is None:
                usage, _ = c.trigger.read(view.list_lengths)
            status = view.status_replicas if desired is None else desired
            hpa_desired = self.hpa.reconcile(now, spec_replicas=current, status_replicas=status, usage=usage)
            if hpa_desired != current:
                desired = hpa_desired
        return desired

    def _keda_scale(self, now: float, active: bool, current: int) -> int | None:
        """The scale executor's part: activation from 0 and deactivation to 0; the HPA does the rest."""
        c = self.config
        if active:
            self._last_active = now
            if current == 0:
                return max(1, c.min_replica_count)
            return None
        if current > 0 and c.min_replica_count == 0:
            if self._last_active is None or now - self._last_active > c.cooldown_period:
                return 0
            return None
        if current < c.min_replica_count:
            return c.min_replica_count
        return None
