"""Scale-in with the workers' answers: the busy floor, scheduled work, idle-first choice, replies."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier
from celery_fleet.planning.scale_in import (
    COST_REMOVE,
    TierWorkers,
    WorkerReport,
    owned_pods,
    plan_removal,
)
from celery_fleet.planning.scaling import Observation, Reason, decide

FAST = {"scale_down_stabilization_seconds": 0, "scale_down_max_step": 10, "cooldown_seconds": 0,
        "target_depth_per_replica": 1}  # fmt: skip


def tier(lo: int = 0, hi: int = 4, **autoscaling: Any) -> Tier:
    return Tier(name="work", queues=["work"], concurrency=1, replicas=ReplicaBounds(min=lo, max=hi),
                autoscaling=Autoscaling(**{**FAST, **autoscaling}))  # fmt: skip


def busy(pod: str, active: int = 1, reserved: int = 0) -> WorkerReport:
    return WorkerReport(pod, active=active, reserved=reserved)


def idle(pod: str, scheduled: int = 0) -> WorkerReport:
    return WorkerReport(pod, scheduled=scheduled)


def census(*workers: WorkerReport) -> TierWorkers:
    return TierWorkers(at=0.0, workers=workers)


def one(t: Tier, obs: Observation, current: int, workers: TierWorkers | None = None, **kw: Any) -> Any:
    (d,) = decide([t], {"work": obs}, {"work": current}, {}, now=100.0,
                  workers={"work": workers} if workers else None, **kw)  # fmt: skip
    return d


# -- decide with and without the census


def test_first_decision_asks_the_workers_before_any_scale_down() -> None:
    d = one(tier(), Observation(0, 2), 4)
    assert (d.desired, d.asks_workers) == (2, True)


def test_issue_12_scenario_keeps_the_busy_workers_under_early_ack() -> None:
    # 4 tasks of 60 s, concurrency 1, early ack: two workers run one and reserve one; Redis sees 2 in flight.
    workers = census(busy("p0", 1, 1), busy("p1", 1, 1), idle("p2"), idle("p3"))
    d = one(tier(), Observation(0, 2), 4, workers)
    # The 2 reserved messages wait behind running tasks: no demand for new pods; the busy floor keeps 2.
    assert (d.desired, d.reason, d.busy_workers, d.asks_workers) == (2, Reason.BUSY_WORKERS, 2, False)
    assert "2 reserved behind running tasks" in d.message
    # Nothing in Redis at all (both tasks running, none reserved): the busy floor still holds 2.
    workers = census(busy("p0"), busy("p1"), idle("p2"), idle("p3"))
    d = one(tier(), Observation(0, 0), 4, workers)
    assert (d.desired, d.reason) == (2, Reason.BUSY_WORKERS)
    assert "kept 2 busy workers" in d.message and "wants 0" in d.message


def test_held_at_busy_count_then_released_when_they_finish() -> None:
    d = one(tier(), Observation(0, 0), 2, census(busy("p0"), busy("p1")))
    assert (d.desired, d.reason) == (2, Reason.BUSY_WORKERS)
    d = one(tier(), Observation(0, 0), 2, census(idle("p0"), idle("p1")))
    assert d.desired == 0


def test_silent_worker_counts_as_busy() -> None:
    d = one(tier(), Observation(0, 0), 2, census(WorkerReport("p0", answered=False), idle("p1")))
    assert d.desired == 1 and "not answering: p0" in d.message


def test_remote_control_off_keeps_todays_behaviour() -> None:
    d = one(tier(), Observation(0, 0), 2, census(WorkerReport("p0", answered=False, remote_control=False), idle("p1")))
    assert d.desired == 0


def test_remove_knob_follows_demand_through_busy_workers() -> None:
    d = one(tier(scale_in_busy_workers="Remove"), Observation(0, 0), 2, census(busy("p0"), busy("p1")))
    assert d.desired == 0 and "scaleInBusyWorkers is Remove" in d.message


def test_budget_cut_never_removes_busy_workers_silently() -> None:
    t_high = Tier(name="high", queues=["h"], concurrency=1, replicas=ReplicaBounds(min=0, max=4),
                  autoscaling=Autoscaling(**FAST))  # fmt: skip
    t_low = Tier(name="low", queues=["l"], concurrency=1, replicas=ReplicaBounds(min=0, max=4),
                 autoscaling=Autoscaling(**FAST))  # fmt: skip
    decisions = decide(
        [t_high, t_low], {"high": Observation(3, 0), "low": Observation(0, 3)}, {"high": 1, "low": 3}, {},
        now=1.0, max_total_replicas=4, workers={"low": census(busy("l0"), busy("l1"), busy("l2"))},
    )  # fmt: skip
    high_d, low_d = decisions
    assert high_d.desired == 3
    assert (low_d.desired, low_d.reason) == (3, Reason.BUSY_WORKERS)
    assert "maxTotalReplicas 4" in low_d.message and "over the budget until they finish" in low_d.message


def test_scheduled_tasks_are_not_demand() -> None:
    # 30 countdown tasks sit in `unacked`: without the census they look like 30 in flight.
    first = one(tier(lo=1), Observation(0, 30), 1)
    assert first.desired == 4 and first.asks_workers
    d = one(tier(lo=1), Observation(0, 30), 1, census(idle("p0", scheduled=30)))
    assert (d.desired, d.scheduled) == (1, 30)
    assert "30 scheduled, not demand" in d.message


def test_a_tier_held_above_its_queue_on_in_flight_work_asks_its_workers() -> None:
    """Raised on a backlog (no census: the queue alone asked for it), then the workers reserved all of it:
    held at max on in-flight work that may be countdown tasks, it asks, and drops to what is demand."""
    held = one(tier(lo=1), Observation(0, 30), 4)
    assert (held.desired, held.asks_workers) == (4, True)
    d = one(tier(lo=1), Observation(0, 30), 4, census(idle("p0", scheduled=30), idle("p1"), idle("p2"), idle("p3")))
    assert (d.desired, d.scheduled) == (1, 30)
    on_queue = one(tier(lo=1), Observation(8, 30), 4)  # the queue alone keeps it at 4: nothing to ask
    assert (on_queue.desired, on_queue.asks_workers) == (4, False)


def test_approximate_in_flight_never_lets_a_tier_go_from_one_to_zero() -> None:
    obs = Observation(0, 3, in_flight_exact=False)
    d = one(tier(count_in_flight=False), obs, 1, census(idle("p0")))
    assert (d.desired, d.reason) == (1, Reason.IN_FLIGHT_APPROXIMATE)


def test_above_maximum_is_the_users_bound_even_with_busy_workers() -> None:
    d = one(tier(hi=1), Observation(0, 0), 2, census(busy("p0"), busy("p1")))
    assert (d.desired, d.reason) == (1, Reason.ABOVE_MAXIMUM)


# -- which pods go


@pytest.mark.parametrize(
    ("workers", "keep", "removed"),
    [
        pytest.param([busy("a"), idle("b"), busy("c"), idle("d")], 2, ("b", "d"), id="idle-first"),
        pytest.param([idle("a", scheduled=5), idle("b")], 1, ("b",), id="fewest-scheduled-first"),
        pytest.param([busy("a"), WorkerReport("b", ready=False), idle("c")], 2, ("b",), id="not-ready-first"),
        pytest.param([busy("a", 3), busy("b", 1)], 1, ("b",), id="busy-holding-least-when-allowed"),
        pytest.param([idle("a")], 1, (), id="nothing"),
    ],
)
def test_plan_removal(workers: list[WorkerReport], keep: int, removed: tuple[str, ...]) -> None:
    plan = plan_removal(workers, keep)
    assert plan.remove == removed
    assert {p for p, c in plan.costs.items() if c == COST_REMOVE} == set(removed)
    kept_costs = [c for p, c in plan.costs.items() if p not in removed]
    assert all(c > COST_REMOVE for c in kept_costs)
    busy_costs = {plan.costs[w.pod] for w in workers if w.busy and w.pod not in removed}
    idle_costs = {plan.costs[w.pod] for w in workers if not w.busy and w.pod not in removed}
    assert not busy_costs or not idle_costs or min(busy_costs) > max(idle_costs)


# -- whose pods: ownership, never labels


def _obj(name: str, uid: str, owner: tuple[str, str] | None, controller: bool = True) -> dict[str, Any]:
    refs = [{"kind": owner[0], "name": "x", "uid": owner[1], "controller": controller}] if owner else []
    return {"metadata": {"name": name, "uid": uid, "ownerReferences": refs}}


@pytest.mark.parametrize(
    ("pod", "ours"),
    [
        pytest.param(_obj("p", "1", ("ReplicaSet", "rs-ours")), True, id="our-replicaset"),
        pytest.param(_obj("p", "1", None), False, id="bare-look-alike"),
        pytest.param(_obj("p", "1", ("ReplicaSet", "rs-theirs")), False, id="replicaset-of-another-deployment"),
        pytest.param(_obj("p", "1", ("ReplicaSet", "rs-orphan")), False, id="replicaset-without-controller"),
        pytest.param(_obj("p", "1", ("ReplicaSet", "rs-ours"), controller=False), False, id="not-the-controller"),
        pytest.param(_obj("p", "1", ("StatefulSet", "rs-ours")), False, id="other-kind-same-uid"),
        pytest.param(_obj("p", "1", ("ReplicaSet", "dep-uid")), False, id="owned-by-the-deployment-uid-itself"),
    ],
)
def test_owned_pods_follow_the_replicaset_to_the_deployment_uid(pod: dict[str, Any], ours: bool) -> None:
    replicasets = [
        _obj("rs-1", "rs-ours", ("Deployment", "dep-uid")),
        _obj("rs-2", "rs-theirs", ("Deployment", "other-uid")),
        _obj("rs-3", "rs-orphan", None),
    ]
    assert owned_pods([pod], replicasets, "dep-uid") == ([pod] if ours else [])
    assert owned_pods([pod], replicasets, "") == []  # no Deployment of ours: no pods


def test_status_reports_scheduled_and_busy_workers() -> None:
    from celery_fleet.planning.pool_status import PoolStatusInput, TierObservation, TierScaling, pool_status

    body, _ = pool_status(
        PoolStatusInput(
            generation=1,
            tiers=[TierObservation("work", exists=True, spec_replicas=1, replicas=1)],
            scaling={"work": TierScaling(desired_replicas=1, scheduled=30, busy_workers=0)},
        )
    )
    assert (body["tiers"][0]["scheduled"], body["tiers"][0]["busyWorkers"]) == (30, 0)


# -- shutdown options in the tier spec


def test_soft_shutdown_remap_and_disable_prefetch_reach_the_worker() -> None:
    from celery_fleet.api.models import parse_pool
    from celery_fleet.planning.workload import termination_grace_period, tier_pod_template, worker_args

    spec = parse_pool({"app": "a", "image": "i", "broker": {"url": "redis://r"}, "tiers": [
        {"name": "work", "queues": ["work"], "concurrency": 1, "replicas": {"min": 0, "max": 2},
         "disablePrefetch": True, "extraArgs": ["--max-tasks-per-child=5"],
         "shutdown": {"softShutdownTimeoutSeconds": 40, "remapSigterm": True, "softShutdownOnIdle": True}},
    ]})  # fmt: skip
    tier_ = spec.tiers[0]
    args = worker_args("a", tier_)
    # Config without a flag goes last, after `--`, where Celery reads `worker_<setting>=value`.
    assert args[args.index("--") :] == [
        "--", "worker_soft_shutdown_timeout=40", "worker_enable_soft_shutdown_on_idle=true",
        "worker_disable_prefetch=(bool)true",
    ]  # fmt: skip
    assert args.index("--max-tasks-per-child=5") < args.index("--")
    assert termination_grace_period(tier_) == 70  # the soft timeout plus the margin
    env = tier_pod_template("p", spec, tier_)["spec"]["containers"][0]["env"]
    assert {"name": "REMAP_SIGTERM", "value": "SIGQUIT"} in env


@pytest.mark.parametrize(
    ("shutdown", "grace", "error"),
    [
        pytest.param({"remapSigterm": True}, None, "remapSigterm needs softShutdownTimeoutSeconds", id="remap-alone"),
        pytest.param(
            {"softShutdownTimeoutSeconds": 60},
            30,
            "must be >= shutdown.softShutdownTimeoutSeconds",
            id="grace-too-short",
        ),
    ],
)
def test_shutdown_rules(shutdown: dict[str, Any], grace: int | None, error: str) -> None:
    from celery_fleet.api.models import InvalidSpec, parse_pool

    t: dict[str, Any] = {"name": "work", "queues": ["work"], "concurrency": 1, "replicas": {"min": 0, "max": 2},
                         "shutdown": shutdown}  # fmt: skip
    if grace is not None:
        t["terminationGracePeriodSeconds"] = grace
    with pytest.raises(InvalidSpec, match=error):
        parse_pool({"app": "a", "image": "i", "broker": {"url": "redis://r"}, "tiers": [t]})


# -- the protocol recorded on the pods (planning.scale_in: begin, finish, release, strays)

from celery_fleet.planning.scale_in import (  # noqa: E402  # the protocol's half of this file
    COST_BUSY,
    SCALE_IN_ANNOTATION,
    Mark,
    Phase,
    TierPod,
    begin,
    finish,
    read_mark,
    release,
    strays,
    write_mark,
)

Q = ("work",)


def pod(name: str, state: Phase | None = None, cost: int | None = None, uid: str | None = None) -> TierPod:
    mark = None if state is None else Mark(state, 1.0, Q, uid if uid is not None else f"uid-{name}")
    return TierPod(name, f"uid-{name}", mark, cost)


@pytest.mark.parametrize(
    ("pods", "workers", "keep", "drain", "marked", "undone"),
    [
        pytest.param(["a", "b", "c"], [idle("a"), busy("b"), idle("c")], 1, ("a", "c"), ("a", "c"), (),
                     id="idle-chosen-and-marked-before-the-drain"),
        pytest.param(["a", "b"], [idle("a"), idle("b", scheduled=2)], 1, ("a",), ("a",), (),
                     id="non-holders-of-eta-first"),
        pytest.param(["a", "b"], [WorkerReport("a", ready=False), idle("b")], 1, ("a",), ("a",), (),
                     id="not-connected-first"),
        pytest.param([("a", Phase.DRAINING), "b"], [idle("a"), idle("b")], 1, ("a",), (), (),
                     id="already-draining-chosen-again-drained-again-not-remarked"),
        pytest.param(["a", ("b", Phase.DRAINING)], [idle("a"), idle("b")], 1, ("b",), (), (),
                     id="drained-one-preferred-over-a-consuming-one"),
        pytest.param([("a", Phase.DRAINING), "b"], [idle("a"), idle("b")], 2, (), (), ("a",),
                     id="marked-but-no-longer-chosen-gets-its-queues-back"),
        pytest.param([("a", Phase.DRAINED), "b"], [idle("a"), busy("b")], 1, ("a",), ("a",), (),
                     id="drained-pod-that-outlived-its-scale-marked-draining-again"),
    ],
)  # fmt: skip
def test_begin(pods: list[Any], workers: list[WorkerReport], keep: int, drain: tuple[str, ...],
               marked: tuple[str, ...], undone: tuple[str, ...]) -> None:  # fmt: skip
    tier_pods = [pod(*p) if isinstance(p, tuple) else pod(p) for p in pods]
    steps = begin(tier_pods, census(*workers), keep, Q, now=5.0)
    assert steps.drain == drain
    assert tuple(sorted(steps.mark)) == marked
    assert all(m.state is Phase.DRAINING and m.queues == Q and m.at == 5.0 for m in steps.mark.values())
    assert steps.undrain == steps.unmark == undone


@pytest.mark.parametrize(
    ("after", "current", "desired", "replicas", "going", "kept", "note"),
    [
        pytest.param({"a": idle("a"), "b": idle("b")}, 3, 1, 1, ("a", "b"), (), "",
                     id="all-idle-after-the-drain-all-go"),
        pytest.param({"a": busy("a"), "b": idle("b")}, 3, 1, 2, ("b",), ("a",), "took work during the census",
                     id="task-started-during-the-first-census-keeps-its-pod-drained"),
        pytest.param({"a": WorkerReport("a", answered=False), "b": idle("b")}, 3, 1, 2, ("b",), ("a",),
                     "did not answer", id="silent-after-the-drain-is-busy"),
        pytest.param({"a": busy("a", 0, 1), "b": busy("b")}, 3, 1, None, (), ("a", "b"), "",
                     id="reserved-only-is-busy-nobody-goes"),
        pytest.param({"a": idle("a", scheduled=1), "b": idle("b")}, 3, 1, 2, ("b",), ("a",), "",
                     id="eta-taken-during-the-drain-kept"),
        pytest.param({"a": WorkerReport("a", ready=False), "b": idle("b")}, 3, 1, 1, ("a", "b"), (), "",
                     id="not-connected-holds-nothing"),
        pytest.param({"a": idle("a"), "b": idle("b")}, 3, 2, 2, ("a",), ("b",), "",
                     id="never-past-the-decision"),
    ],
)  # fmt: skip
def test_finish(after: dict[str, WorkerReport], current: int, desired: int, replicas: int | None,
                going: tuple[str, ...], kept: tuple[str, ...], note: str) -> None:  # fmt: skip
    pods = [pod("a", Phase.DRAINING), pod("b", Phase.DRAINING), pod("c")]
    before = census(idle("a"), idle("b"), busy("c"))
    steps = finish(pods, ["a", "b"], after, current, desired, Q, 9.0, before)
    assert steps.replicas == replicas
    assert tuple(sorted(steps.mark)) == going
    assert all(m.state is Phase.DRAINED for m in steps.mark.values())
    assert {p for p, c in steps.costs.items() if c == COST_REMOVE} == set(going)
    assert steps.costs["c"] >= COST_BUSY  # the busy one is the last the ReplicaSet controller would take
    assert steps.kept == kept
    assert note in steps.note


@pytest.mark.parametrize(
    ("pods", "replicas", "undrain", "unmark"),
    [
        pytest.param([pod("a", Phase.DRAINING), pod("b")], None, ("a",), ("a",), id="demand-returns"),
        pytest.param([pod("a", Phase.DRAINED, COST_REMOVE), pod("b")], 1, (), (),
                     id="drained-on-its-way-out-left-alone"),
        pytest.param([pod("a", Phase.DRAINED, COST_REMOVE), pod("b")], 2, ("a",), ("a",),
                     id="drained-but-the-scale-never-came-undone"),
        pytest.param([pod("a", Phase.DRAINED, 0), pod("b")], 1, ("a",), ("a",),
                     id="drained-without-its-cost-undone"),
        pytest.param([pod("a", Phase.DRAINING), pod("b")], 1, ("a",), ("a",),
                     id="draining-is-never-on-its-way-out"),
        pytest.param([pod("a", Phase.DRAINING, uid="someone-else"), pod("b")], None, (), ("a",),
                     id="copied-mark-removed-nothing-undrained"),
    ],
)  # fmt: skip
def test_release(pods: list[TierPod], replicas: int | None, undrain: tuple[str, ...], unmark: tuple[str, ...]) -> None:
    steps = release(pods, replicas=replicas)
    assert (steps.undrain, steps.unmark) == (undrain, unmark)


def test_strays_are_unmarked_live_workers_consuming_none_of_the_tier_queues() -> None:
    workers = census(
        WorkerReport("a", queues=frozenset()),  # a drain whose mark was lost
        WorkerReport("b", queues=frozenset({"work"})),
        WorkerReport("c", queues=None),  # not known (the kombu client does not ask): left alone
        WorkerReport("d", queues=frozenset({"other"})),
        WorkerReport("e", queues=frozenset()),  # marked: the protocol owns it
    )
    pods = [pod("a"), pod("b"), pod("c"), pod("d"), pod("e", Phase.DRAINING)]
    assert strays(pods, workers, Q) == ("a", "d")


@pytest.mark.parametrize(
    ("raw", "state", "queues"),
    [
        pytest.param(Mark(Phase.DRAINED, 3.0, Q, "u").value(), Phase.DRAINED, Q, id="round-trip"),
        pytest.param("{not json", Phase.DRAINING, (), id="malformed-reads-as-draining"),
        pytest.param('{"state":"x","at":1,"queues":[],"uid":"u"}', Phase.DRAINING, (), id="unknown-state"),
        pytest.param("x" * 5000, Phase.DRAINING, (), id="oversized-not-parsed"),
    ],
)  # fmt: skip
def test_read_mark_is_bounded_and_never_fails(raw: str, state: Phase, queues: tuple[str, ...]) -> None:
    mark = read_mark({"metadata": {"uid": "u", "annotations": {SCALE_IN_ANNOTATION: raw}}})
    assert mark is not None and (mark.state, mark.queues) == (state, queues)


def test_write_mark_sets_and_removes_annotation_and_label_together() -> None:
    patch = write_mark(Mark(Phase.DRAINING, 1.0, Q, "u"))
    assert patch["metadata"]["labels"] == {"celeryfleet.io/scale-in": "draining"}
    assert read_mark({"metadata": {"uid": "u", **patch["metadata"]}}) == Mark(Phase.DRAINING, 1.0, Q, "u")
    gone = write_mark(None)["metadata"]
    assert gone == {"annotations": {SCALE_IN_ANNOTATION: None}, "labels": {"celeryfleet.io/scale-in": None}}


# -- demand with the census: prefetch hostage, ETA, orphans


@pytest.mark.parametrize(
    ("obs", "current", "workers", "desired", "reason", "said"),
    [
        pytest.param(Observation(0, 2), 2, [busy("a", 1, 1), busy("b", 1, 1)], 2, Reason.BUSY_WORKERS,
                     "2 reserved behind running tasks", id="hostage-is-no-demand-for-new-pods"),
        pytest.param(Observation(0, 2), 2, [busy("a", 1, 1), busy("b", 1, 1)], 2, Reason.BUSY_WORKERS, "",
                     id="hostage-raises-nothing"),
        pytest.param(Observation(0, 2), 4, [busy("a", 1, 1), busy("b", 1, 1), idle("c"), idle("d")], 2,
                     Reason.BUSY_WORKERS, "kept 2 busy", id="pods-started-for-the-hostage-go"),
        pytest.param(Observation(0, 30), 3, [idle("a", scheduled=30), idle("b"), idle("c")], 1,
                     Reason.BUSY_WORKERS, "holding ETA", id="eta-holder-kept-others-go"),
        pytest.param(Observation(0, 30), 1, [idle("a", scheduled=30)], 1, Reason.BUSY_WORKERS, "holding ETA",
                     id="never-to-zero-while-eta-held"),
        pytest.param(Observation(0, 4), 3, [idle("a"), idle("b"), idle("c")], 1, Reason.QUEUE_DRAINED,
                     "4 orphaned", id="orphans-ask-for-one-worker"),
        pytest.param(Observation(0, 4), 3, [idle("a"), WorkerReport("b", answered=False), idle("c")], 4,
                     Reason.QUEUE_BACKLOG, "4 in flight", id="orphans-need-every-worker-to-answer"),
        pytest.param(Observation(0, 4), 1, [idle("a")], 1, Reason.STEADY, "orphaned", id="orphans-hold-one"),
    ],
)  # fmt: skip
def test_demand_with_the_census(obs: Observation, current: int, workers: list[WorkerReport], desired: int,
                                reason: Reason, said: str) -> None:  # fmt: skip
    d = one(tier(lo=0, hi=4), obs, current, census(*workers))
    assert (d.desired, d.reason) == (desired, reason), d.message
    assert said in d.message


def test_orphans_are_reported_only_when_the_census_covers_the_tier() -> None:
    covered = one(tier(), Observation(0, 5), 2, census(busy("a", 1, 1), idle("b")))
    # 5 in unacked; the live workers hold 2 (a running task counts, as under acks_late: never more orphans
    # than there are, under early ack at most the running tasks fewer)
    assert covered.orphaned == 3
    partial = one(tier(), Observation(0, 5), 2, census(busy("a", 1, 1), WorkerReport("b", answered=False)))
    assert partial.orphaned is None


def test_finish_removes_busy_candidates_only_when_the_tier_says_so() -> None:
    pods = [pod("a", Phase.DRAINING), pod("b")]
    before = census(busy("a"), idle("b"))
    kept = finish(pods, ["a"], {"a": busy("a")}, 2, 1, Q, 1.0, before)
    gone = finish(pods, ["a"], {"a": busy("a")}, 2, 1, Q, 1.0, before, remove_busy=True)
    assert (kept.replicas, kept.kept, gone.replicas, tuple(gone.mark)) == (None, ("a",), 1, ("a",))
