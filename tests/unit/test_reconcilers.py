"""The pool and beat reconcilers' decisions, without a cluster: the real reconcilers run against a
recording fake of the API (tests/support/fake_api.py) over a watch cache filled by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from celery_fleet.api.models import Tier
from celery_fleet.handlers.beat_reconciler import BeatReconciler
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache, ObjKey
from celery_fleet.handlers.pool_reconciler import PoolReconciler, replicas_for
from celery_fleet.kube.client import Kube
from celery_fleet.kube.events import EventPoster, EventType, ObjectRef
from tests.support.fake_api import RecordingApi
from tests.support.samples import sample
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "shop"
ELECTOR_IMAGE = "ghcr.io/celery-fleet/celery-fleet:0.1.0"


def _pool(**spec: Any) -> dict[str, Any]:
    body = sample("pool-three-tiers.yaml", "CeleryWorkerPool")
    body["spec"].update(spec)
    return body


def _reconcile_pool(body: dict[str, Any], api: RecordingApi | None = None) -> tuple[RecordingApi, FleetCache, Any]:
    api = api or RecordingApi()
    cache = FleetCache()
    key = cache.put_pool(body)
    reconciler = PoolReconciler(Kube(api), cache)  # type: ignore[arg-type]  # duck-typed ApiClient
    outcome = reconciler.reconcile(key)
    # Events are posted off the reconcile's thread: a write counted later must not be one of these.
    wait_for(lambda: reconciler.events.pending() == 0, timeout=10, interval=0.01, message="events posted")
    return api, cache, outcome


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def _deployments(api: RecordingApi) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in api.applied() if o["kind"] == "Deployment"}


def test_a_new_pool_gets_a_deployment_per_tier_at_its_minimum_and_a_status() -> None:
    api, _, outcome = _reconcile_pool(_pool())
    assert not outcome.error
    tiers = _pool()["spec"]["tiers"]
    deployments = _deployments(api)
    assert set(deployments) == {f"billing-{t['name']}" for t in tiers}
    for t in tiers:
        assert deployments[f"billing-{t['name']}"]["spec"]["replicas"] == t["replicas"]["min"]
    status = api.statuses()[-1]
    assert status["observedGeneration"] == 1
    assert _condition(status, "Degraded")["status"] == "False"


def test_a_pool_that_is_not_valid_writes_only_its_status() -> None:
    api, _, outcome = _reconcile_pool(_pool(tiers=[]))
    assert not outcome.error  # retrying cannot help: the spec must change, which wakes us
    assert not api.applied()
    degraded = _condition(api.statuses()[-1], "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "spec.tiers" in degraded["message"]


def test_a_spec_only_the_builders_refuse_is_degraded_not_a_crash() -> None:
    api, _, outcome = _reconcile_pool(_pool(env=[{"name": "CELERY_BROKER_URL", "value": "redis://x:6379/0"}]))
    assert not outcome.error
    assert not _deployments(api)
    degraded = _condition(api.statuses()[-1], "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "spec.env[0].name" in degraded["message"]


def test_a_missing_broker_secret_creates_nothing_and_retries() -> None:
    api, _, outcome = _reconcile_pool(_pool(), RecordingApi(broker_url=None))
    assert outcome.error  # nothing wakes us when the Secret appears: back off and look again
    assert not _deployments(api)
    degraded = _condition(api.statuses()[-1], "Degraded")
    assert degraded["reason"] == "BrokerSecretMissing"
    assert "billing-broker" in degraded["message"] and "change-me" not in str(api.writes)


def test_a_paused_pool_leaves_its_children_alone() -> None:
    api, _, outcome = _reconcile_pool(_pool(paused=True))
    assert not outcome.error
    assert not api.applied()
    assert api.statuses()


def test_a_removed_tier_is_deleted_and_a_stranger_is_not() -> None:
    body = _pool()
    api = RecordingApi()
    cache = FleetCache()
    key = cache.put_pool(body)
    for name, owner_uid in (("billing-gone", body["metadata"]["uid"]), ("billing-foreign", "someone-else")):
        ref = {"kind": "CeleryWorkerPool", "name": "billing", "uid": owner_uid, "controller": True}
        meta = {"name": name, "namespace": NAMESPACE, "uid": f"{name}-uid", "labels": {POOL_LABEL: "billing"},
                "ownerReferences": [ref]}  # fmt: skip
        cache.put_child(POOL_LABEL, {"kind": "Deployment", "metadata": meta, "spec": {"replicas": 1}})
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    assert [p.rsplit("/", 1)[-1] for p in api.deleted()] == ["billing-gone"]


def test_a_converged_pool_sends_nothing_on_the_next_event() -> None:
    api, cache, _ = _reconcile_pool(_pool())
    key: ObjKey = (NAMESPACE, "billing")
    body = cache.pool(key)
    assert body is not None
    cache.put_pool({**body, "status": api.statuses()[-1]})  # the watch brings our status back
    before = len(api.writes)
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    assert api.writes[before:] == []


TIER = Tier.model_validate({"name": "high", "queues": ["q"], "concurrency": 1, "replicas": {"min": 2, "max": 8}})


@pytest.mark.parametrize(
    ("observed", "scaler", "expected"),
    [
        pytest.param(None, None, 2, id="new-tier-starts-at-min"),
        pytest.param({"spec": {"replicas": 5}}, None, 5, id="keeps-the-current-value"),
        pytest.param({"spec": {"replicas": 50}}, None, 8, id="current-above-max-is-capped"),
        pytest.param({"spec": {"replicas": 5}}, 7, 7, id="the-autoscalers-value-wins"),
        pytest.param({"spec": {"replicas": 5}}, 0, 2, id="the-autoscaler-is-held-to-min"),
    ],
)
def test_one_value_of_spec_replicas(observed: dict[str, Any] | None, scaler: int | None, expected: int) -> None:
    assert replicas_for(TIER, observed, scaler) == expected


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        pytest.param({"spec": {"replicas": 50}}, 50, id="the-other-autoscalers-count-is-kept-even-above-max"),
        pytest.param(None, 2, id="a-tier-not-yet-created-starts-at-min"),
    ],
)
def test_a_tier_held_by_another_autoscaler_keeps_its_count(observed: dict[str, Any] | None, expected: int) -> None:
    assert replicas_for(TIER, observed, None, held=True) == expected


def test_an_hpa_on_a_tier_raises_scaler_conflict_with_a_warning_event_and_holds_the_tier() -> None:
    api = RecordingApi()
    cache = FleetCache()
    key = cache.put_pool(_pool())
    hpa = {
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "legacy", "namespace": NAMESPACE},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "billing-high"}},
    }
    assert cache.put_other_scaler(hpa) == [key]  # its pool is reconciled
    posted: list[tuple[str, str]] = []

    class Recorded(EventPoster):
        def post(self, ref: ObjectRef, reason: str, message: str, type_: EventType = "Normal") -> None:
            posted.append((reason, type_))

    kube = Kube(api)  # type: ignore[arg-type]  # duck-typed ApiClient
    reconciler = PoolReconciler(kube, cache, events=Recorded(kube))
    reconciler.reconcile(key)
    conflict = _condition(api.statuses()[-1], "ScalerConflict")
    assert (conflict["status"], conflict["reason"]) == ("True", "OtherAutoscaler")
    assert "HorizontalPodAutoscaler legacy" in conflict["message"]
    assert cache.runtime[key].held_by_other_scaler == frozenset({"high"})
    assert [p for p in posted if p[0] == "ScalerConflict"] == [("ScalerConflict", "Warning")]

    cache.put_pool({**(cache.pool(key) or {}), "status": api.statuses()[-1]})
    assert cache.put_other_scaler(hpa, deleted=True) == [key]
    reconciler.reconcile(key)
    assert _condition(api.statuses()[-1], "ScalerConflict")["status"] == "False"
    assert cache.runtime[key].held_by_other_scaler == frozenset()


def _reconcile_beat(body: dict[str, Any], api: RecordingApi | None = None) -> tuple[RecordingApi, Any]:
    api = api or RecordingApi()
    cache = FleetCache()
    key = cache.put_beat(body)
    outcome = BeatReconciler(Kube(api), cache, ELECTOR_IMAGE).reconcile(key)  # type: ignore[arg-type]
    return api, outcome


def _beat(**spec: Any) -> dict[str, Any]:
    body = sample("beat.yaml", "CeleryBeat")
    body["spec"].update(spec)
    return body


def test_a_new_beat_gets_its_identity_and_lease_before_its_pods() -> None:
    api, outcome = _reconcile_beat(_beat())
    assert not outcome.error
    kinds = [o["kind"] for o in api.applied()]
    assert kinds == ["ServiceAccount", "Lease", "Role", "RoleBinding", "Deployment"]
    deployment = api.applied()[-1]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two beats from a rollout
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["image"] for c in init] == [ELECTOR_IMAGE]


def _warnings(api: RecordingApi) -> list[tuple[str, str]]:
    return [
        (b["reason"], b.get("message") or b.get("note") or "")
        for (m, path, b) in api.writes
        if m == "POST" and "/events" in path and b.get("type") == "Warning"
    ]


def test_a_beat_on_a_scheduler_that_cannot_be_exactly_once_is_warned_about_once() -> None:
    body = _beat(scheduler="celery.beat:PersistentScheduler")
    api, cache = RecordingApi(), FleetCache()
    key = cache.put_beat(body)
    reconciler = BeatReconciler(Kube(api), cache, ELECTOR_IMAGE)  # type: ignore[arg-type]
    reconciler.reconcile(key)
    reconciler.reconcile(key)
    warned = [w for w in _warnings(api) if w[0] == "SchedulerNotExactlyOnce"]
    assert len(warned) == 1 and "file of the pod" in warned[0][1]
    assert "--schedule-state" not in api.applied()[-1]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_beat_on_the_default_scheduler_is_not_warned_about() -> None:
    api, _ = _reconcile_beat(_beat())
    assert not [w for w in _warnings(api) if w[0] == "SchedulerNotExactlyOnce"]
    command = api.applied()[-1]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--schedule-state" in command and "celery_fleet.beat.scheduler:LeaseScheduler" in command


def test_a_beat_whose_broker_secret_is_missing_runs_no_pods() -> None:
    body = _beat(broker={"urlSecretRef": {"name": "shop-broker", "key": "url"}})
    api, outcome = _reconcile_beat(body, RecordingApi(broker_url=None))
    assert outcome.error
    assert not api.applied()
    assert _condition(api.statuses()[-1], "Degraded")["reason"] == "BrokerSecretMissing"


def test_a_beat_that_is_not_valid_writes_only_its_status() -> None:
    api, outcome = _reconcile_beat(_beat(standby=-1))
    assert not outcome.error
    assert not api.applied()
    assert _condition(api.statuses()[-1], "Degraded")["reason"] == "InvalidSpec"


def test_a_raised_min_becomes_the_count_so_lowering_it_again_is_the_autoscalers_scale_down() -> None:
    # The autoscaler last wrote 0 (replicas.min 0); min 2 raises it to 2; min 0 again must not write
    # 0 from the reconciler: that would remove workers without asking them (scale-in's census).
    body = _pool()
    api, cache = RecordingApi(), FleetCache()
    key = cache.put_pool(body)
    cache.runtime[key].desired["high"] = 0
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    assert _deployments(api)["billing-high"]["spec"]["replicas"] == 2
    lowered = _pool()
    lowered["spec"]["tiers"][0]["replicas"]["min"] = 0
    lowered["metadata"]["generation"] = int(body["metadata"].get("generation", 1)) + 1
    cache.put_pool(lowered)
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    assert cache.runtime[key].desired["high"] == 2
    assert _deployments(api)["billing-high"]["spec"]["replicas"] == 2


def test_progress_only_status_writes_are_coalesced_and_a_condition_change_is_not() -> None:
    """Pods starting change a pool's counts several times a second during a rollout: at most one such
    write per 2 s per pool (the held one is requeued), while a condition that changes is written at once."""
    api, cache, now = RecordingApi(), FleetCache(), [0.0]
    key = cache.put_pool(_pool())
    reconciler = PoolReconciler(Kube(api), cache, clock=lambda: now[0])  # type: ignore[arg-type]  # duck-typed ApiClient
    reconciler.reconcile(key)
    written = len(api.statuses())
    names = sorted(name for kind, name in cache.children_of(key) if kind == "Deployment")

    def ready(name: str, n: int) -> None:
        child = cache.children_of(key)[("Deployment", name)]
        wanted = child["spec"]["replicas"]
        status = {"replicas": wanted, "readyReplicas": n, "availableReplicas": n, "updatedReplicas": wanted,
                  "observedGeneration": 1}  # fmt: skip
        cache.put_child(POOL_LABEL, {**child, "kind": "Deployment", "status": status})

    now[0] = 0.5
    ready(names[0], 1)  # one pod of the first tier is up: only counts change
    outcome = reconciler.reconcile(key)
    assert len(api.statuses()) == written  # held back
    assert outcome.requeue_after == pytest.approx(1.5)
    now[0] = 2.0
    reconciler.reconcile(key)
    assert len(api.statuses()) == written + 1  # the held write lands when due
    now[0] = 2.1
    for name in names:  # every tier ready: Ready turns True, written at once
        ready(name, cache.children_of(key)[("Deployment", name)]["spec"]["replicas"])
    reconciler.reconcile(key)
    assert len(api.statuses()) == written + 2
    assert _condition(api.statuses()[-1], "Ready")["status"] == "True"


@pytest.mark.parametrize(
    ("problem", "status"),
    [
        pytest.param(("BrokerOwnPollSlow", "our own read overran its budget"), "True", id="own-slow-poll-is-about-us"),
        pytest.param(("BrokerUnreachable", "cannot reach redis:6379/0"), "False", id="unreachable-broker"),
    ],
)
def test_broker_reachable_names_our_own_slow_poll_as_ours(problem: tuple[str, str], status: str) -> None:
    api = RecordingApi()
    cache = FleetCache()
    key = cache.put_pool(_pool())
    cache.runtime[key].broker_problem = problem
    PoolReconciler(Kube(api), cache).reconcile(key)  # type: ignore[arg-type]  # duck-typed ApiClient
    condition = _condition(api.statuses()[-1], "BrokerReachable")
    assert (condition["status"], condition["reason"]) == (status, problem[0])


class _PoolGoneApi(RecordingApi):
    """The pool was deleted with its namespace: writes for it answer 404; `exists` says what a GET of it finds."""

    def __init__(self, exists: bool) -> None:
        super().__init__()
        self.exists = exists

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        if "/celeryworkerpools/" in path:
            self.calls.append((method, path, {}, ""))
            namespace, name = path.split("/")[5], path.split("/")[7]
            if method == "GET" and self.exists:
                return {"metadata": {"namespace": namespace, "name": name, "uid": "u1"}}, 200, {}
            raise ApiException(status=404, reason="Not Found")
        return super().call_api(path, method, **kwargs)


@pytest.mark.parametrize("exists", [False, True], ids=["gone-is-forgotten", "a-404-of-something-else-is-retried"])
def test_a_pool_deleted_with_its_namespace_is_forgotten_not_retried_forever(exists: bool) -> None:
    """Deleting a namespace stops its watch before the pool's DELETED event: a 404 for the pool itself,
    confirmed by a GET, drops it from the cache (the autoscaler forgets what is not cached)."""
    body = _pool()
    body["metadata"].update(namespace=NAMESPACE, uid="u1")
    _, cache, outcome = _reconcile_pool(body, _PoolGoneApi(exists))
    key = (NAMESPACE, body["metadata"]["name"])
    assert outcome.error is exists
    assert (cache.pool(key) is not None) is exists
