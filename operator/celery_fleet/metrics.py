"""Prometheus metrics of the operator. Labels never carry broker URLs or credentials.

Labels follow celery-exporter's names where they mean the same (`queue_name`), plus our own
`namespace`, `pool` and `tier`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


# Series a pool may have, and a namespace (its pools together), before new ones are left out: a
# maximal pool (10 tiers x 32 queues x 10 priority steps) makes ~3,500 series and 100 of them made
# one scrape peak at 515 MB. 0: no cap. `celery-fleet run --metrics-max-series-per-pool/-namespace`.
DEFAULT_SERIES_PER_POOL = 500
DEFAULT_SERIES_PER_NAMESPACE = 20_000


class SeriesBudget:
    """How many series each pool and each namespace holds across the gauges that share this budget,
    and which new ones were left out (each counted once in `celery_fleet_metric_series_dropped_total`).

    The pool's cap counts and refuses only series of gauges marked `capped` (one per queue or
    priority list: the ones that grow with the spec; a pool's other series are at most 71); the
    namespace's cap counts and refuses every series, so a namespace of many small pools is bounded too.
    """

    def __init__(self, per_pool: int = 0, per_namespace: int = 0) -> None:
        self.per_pool, self.per_namespace = per_pool, per_namespace
        self._pools: dict[tuple[str, str], list[int]] = {}  # owner -> [every series, capped series]
        self._namespaces: dict[str, int] = {}
        self._dropped: dict[tuple[str, str], set[int]] = {}  # hashes of the label sets left out, per pool
        self.on_drop: Callable[[str], None] = lambda namespace: None

    def configure(self, per_pool: int, per_namespace: int) -> None:
        self.per_pool, self.per_namespace = per_pool, per_namespace

    def admit(self, owner: tuple[str, str], labels: tuple[str, ...], capped: bool) -> bool:
        """Whether a new series of `owner` may be kept; counts it when it is."""
        counts = self._pools.get(owner) or [0, 0]
        namespace = self._namespaces.get(owner[0], 0)
        if (capped and 0 < self.per_pool <= counts[1]) or 0 < self.per_namespace <= namespace:
            left_out = self._dropped.setdefault(owner, set())
            if hash(labels) not in left_out:
                left_out.add(hash(labels))
                self.on_drop(owner[0])
            return False
        counts[0] += 1
        counts[1] += capped
        self._pools[owner], self._namespaces[owner[0]] = counts, namespace + 1
        return True

    def release(self, owner: tuple[str, str], n: int, *, capped: bool, gone: bool) -> None:
        """`n` series of `owner` were removed (`gone`: it has none left in that gauge)."""
        counts = self._pools.get(owner)
        if n and counts is not None:
            counts[0] -= n
            counts[1] -= n if capped else 0
            if counts[0] <= 0:
                del self._pools[owner]
            in_namespace = self._namespaces.get(owner[0], 0) - n
            if in_namespace > 0:
                self._namespaces[owner[0]] = in_namespace
            else:
                self._namespaces.pop(owner[0], None)
        if gone and owner not in self._pools:
            self._dropped.pop(owner, None)  # a pool created again under its name is counted afresh

    def held(self, owner: tuple[str, str], *, capped: bool = False) -> int:
        """Series `owner` holds (`capped`: only those its own cap counts)."""
        counts = self._pools.get(owner)
        return 0 if counts is None else counts[1 if capped else 0]

    def left_out(self, owner: tuple[str, str]) -> int:
        return len(self._dropped.get(owner, ()))


class OwnedGauge(Collector):
    """A gauge whose series each belong to one object: its first two labels are that object's
    namespace and name. Samples are plain floats grouped by object, rendered when scraped.

    prometheus_client's Gauge keeps an object per label set (a value with its own lock): at 1000
    pools x ~25 series that was 13 MiB. Grouping by object also makes removing one pool's series
    cost that pool's series, not a scan of every pool's.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        *,
        budget: SeriesBudget | None = None,
        capped: bool = False,
    ) -> None:
        assert tuple(labelnames[:2]) in {("namespace", "pool"), ("namespace", "beat")}, labelnames
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._samples: dict[tuple[str, str], dict[tuple[str, ...], float]] = {}
        self.budget, self.capped = budget, capped
        registry.register(self)

    def get(self, labels: tuple[str, ...]) -> float | None:
        return self._samples.get((labels[0], labels[1]), {}).get(labels)

    def set(self, labels: tuple[str, ...], value: float) -> bool:
        """Set a series; False when it is new and its pool's or namespace's budget is spent (left out)."""
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values wanted, got {len(labels)}")
        owner = (labels[0], labels[1])
        series = self._samples.get(owner)
        if series is None or labels not in series:
            if self.budget is not None and not self.budget.admit(owner, labels, self.capped):
                return False
            if series is None:
                series = self._samples[owner] = {}
        series[labels] = float(value)
        return True

    def remove_by_labels(self, labels: Mapping[str, str]) -> None:
        """Remove the series matching every given label (namespace and name among them)."""
        owner = (labels[self.labelnames[0]], labels[self.labelnames[1]])
        series = self._samples.get(owner)
        if series is None:
            return
        at = [(self.labelnames.index(k), v) for k, v in labels.items()]
        removed = [k for k in series if all(k[i] == v for i, v in at)]
        for key in removed:
            del series[key]
        if not series:
            del self._samples[owner]
        if self.budget is not None:
            self.budget.release(owner, len(removed), capped=self.capped, gone=not series)

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for series in list(self._samples.values()):  # scraped from another thread: copies, not live views
            for labels, value in list(series.items()):
                family.add_metric(labels, value)
        yield family


SERIES_BUDGET = SeriesBudget(DEFAULT_SERIES_PER_POOL, DEFAULT_SERIES_PER_NAMESPACE)
SERIES_DROPPED = Counter(
    "celery_fleet_metric_series_dropped",
    "Distinct per-pool series left out because the pool or its namespace reached its series cap "
    "(--metrics-max-series-per-pool / --metrics-max-series-per-namespace).",
    ["namespace"],
    registry=REGISTRY,
)
SERIES_BUDGET.on_drop = lambda namespace: SERIES_DROPPED.labels(namespace).inc()

RECONCILES = Counter(
    "celery_fleet_reconciles_total",
    "Reconciliations of pools and beats by kind and result.",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "celery_fleet_reconcile_duration_seconds",
    "Time spent reconciling one object.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
POOLS = Gauge("celery_fleet_pools", "CeleryWorkerPools managed.", registry=REGISTRY)
TIERS = Gauge("celery_fleet_tiers", "Tiers managed over all pools.", registry=REGISTRY)
BEATS = Gauge("celery_fleet_beats", "CeleryBeats managed.", registry=REGISTRY)
CHILD_WRITES = Counter(
    "celery_fleet_child_writes_total",
    "Child objects written, by kind and action.",
    ["kind", "action"],
    registry=REGISTRY,
)

QUEUE_DEPTH = OwnedGauge(
    "celery_fleet_queue_depth",
    "Messages waiting in a queue's priority sub-list.",
    ["namespace", "pool", "tier", "queue_name", "priority"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
    capped=True,
)
IN_FLIGHT = OwnedGauge(
    "celery_fleet_queue_in_flight",
    "Messages reserved or running (kombu unacked) for a queue.",
    ["namespace", "pool", "tier", "queue_name"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
    capped=True,
)
DESIRED_REPLICAS = OwnedGauge(
    "celery_fleet_tier_desired_replicas",
    "Replicas the autoscaler wants.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)
CURRENT_REPLICAS = OwnedGauge(
    "celery_fleet_tier_replicas",
    "spec.replicas of the tier Deployment.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)
MAX_REPLICAS = OwnedGauge(
    "celery_fleet_tier_max_replicas",
    "replicas.max of the tier.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)
SCALING_DECISIONS = Counter(
    "celery_fleet_scaling_decisions_total",
    "Replica changes made by the autoscaler.",
    ["namespace", "pool", "tier", "direction", "reason"],
    registry=REGISTRY,
)
POLL_SECONDS = Histogram(
    "celery_fleet_broker_poll_duration_seconds",
    "One pipelined queue-depth read of one broker.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
BROKER_ERRORS = Counter("celery_fleet_broker_errors_total", "Failed broker reads by kind.", ["kind"], registry=REGISTRY)
BROKER_UP = OwnedGauge(
    "celery_fleet_broker_reachable",
    "1 when the pool's broker answered the last poll.",
    ["namespace", "pool"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)
BEAT_LEADER_CHANGES = Counter(
    "celery_fleet_beat_leader_changes_total",
    "Observed changes of a beat's Lease holder.",
    ["namespace", "beat"],
    registry=REGISTRY,
)
BEAT_HAS_LEADER = Gauge(
    "celery_fleet_beat_has_leader",
    "1 while a beat's Lease is held and renewed.",
    ["namespace", "beat"],
    registry=REGISTRY,
)
BEAT_LEADERLESS_SECONDS = Gauge(
    "celery_fleet_beat_leaderless_seconds",
    "Seconds since a beat's Lease was last held (0 while held).",
    ["namespace", "beat"],
    registry=REGISTRY,
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics; port 0 disables it."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)


class _KubeRequests(Collector):
    """The apiserver requests counted by the client, read at scrape time (no lock on the hot path)."""

    def __init__(self) -> None:
        self.counts: Callable[[], Mapping[tuple[str, str], int]] = dict

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "celery_fleet_kube_api_requests",
            "Requests made to the apiserver since start by reconcilers and the autoscaler, by verb and "
            "resource (Kopf's watches not included).",
            labels=["verb", "resource"],
        )
        for (verb, resource), n in sorted(dict(self.counts()).items()):
            family.add_metric([verb, resource], n)
        yield family


KUBE_REQUESTS = _KubeRequests()
REGISTRY.register(KUBE_REQUESTS)


# -- scale-in (remote control)
WORKER_CENSUSES = Counter(
    "celery_fleet_worker_censuses_total",
    "Times a tier's workers were asked what they hold before a scale-in decision, by result.",
    ["result"],
    registry=REGISTRY,
)
WORKER_CENSUS_SECONDS = Histogram(
    "celery_fleet_worker_census_seconds",
    "Time to ask a tier's workers (returns early once every worker answered).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
    registry=REGISTRY,
)
REMOTE_CONTROL_BROADCASTS = Counter(
    "celery_fleet_remote_control_broadcasts_total",
    "Celery remote-control broadcasts sent (inspect, cancel_consumer, add_consumer).",
    registry=REGISTRY,
)
BUSY_WORKERS = OwnedGauge(
    "celery_fleet_tier_busy_workers",
    "Workers that ran or held tasks, or did not answer, at the tier's last scale-in decision.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)
SCHEDULED_TASKS = OwnedGauge(
    "celery_fleet_tier_scheduled_tasks",
    "ETA / countdown tasks the tier's workers hold until due (not demand), at the last decision.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)

STALE_UNACKED = OwnedGauge(
    "celery_fleet_tier_stale_unacked_messages",
    "Messages of the tier's queues in `unacked` past the visibility timeout (left by dead workers; "
    "kombu restores them), not counted in flight.",
    ["namespace", "pool", "tier"],
    registry=REGISTRY,
    budget=SERIES_BUDGET,
)


# Every series labelled with one pool (and its tiers and queues) or one beat: removed with it, so a
# deleted pool's broker-unreachable gauge cannot keep an alert firing.
QUEUE_SERIES = (QUEUE_DEPTH, IN_FLIGHT)
TIER_SERIES: tuple[OwnedGauge | Counter, ...] = (
    *QUEUE_SERIES,
    DESIRED_REPLICAS,
    CURRENT_REPLICAS,
    MAX_REPLICAS,
    SCALING_DECISIONS,
    BUSY_WORKERS,
    SCHEDULED_TASKS,
    STALE_UNACKED,
)
POOL_SERIES: tuple[OwnedGauge | Counter, ...] = (*TIER_SERIES, BROKER_UP)
BEAT_SERIES = (BEAT_LEADER_CHANGES, BEAT_HAS_LEADER, BEAT_LEADERLESS_SECONDS)


def forget_pool(namespace: str, pool: str, *, tier: str | None = None, queue: str | None = None) -> None:
    """Remove a pool's series, or only one tier's, or only those of one queue of a tier."""
    labels = {"namespace": namespace, "pool": pool}
    metrics: tuple[OwnedGauge | Counter, ...] = POOL_SERIES
    if tier is not None:
        labels["tier"], metrics = tier, TIER_SERIES
    if queue is not None:
        labels["queue_name"], metrics = queue, QUEUE_SERIES
    for metric in metrics:
        metric.remove_by_labels(labels)


def forget_beat(namespace: str, beat: str) -> None:
    for metric in BEAT_SERIES:
        metric.remove_by_labels({"namespace": namespace, "beat": beat})
