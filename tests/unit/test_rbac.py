"""The operator's RBAC (celery_fleet.rbac): complete for what the code sends, nothing more, and fresh.

The requests are not listed by hand here: the real reconcilers run against a recording API
client, and every request they send must be allowed by the generated rules. The Kopf watches
come from Kopf's own registry of our handlers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes.client.rest import ApiException

from celery_fleet.api import generated
from celery_fleet.handlers import kopf_handlers
from celery_fleet.handlers.beat_reconciler import BeatReconciler
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache
from celery_fleet.handlers.pool_reconciler import PoolReconciler
from celery_fleet.kube.client import Kube
from celery_fleet.planning.beat_workload import beat_role
from celery_fleet.rbac import render
from celery_fleet.rbac import rules as rbac
from tests.support.fake_api import RecordingApi
from tests.support.rbac_check import Request, allows, requests_for
from tests.support.samples import sample

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "shop"

ALL = rbac.Mode(all_namespaces=True)
LISTED = rbac.Mode(all_namespaces=False)
MODES = [pytest.param(ALL, id="all-namespaces"), pytest.param(LISTED, id="listed-namespaces")]


def _pool_requests() -> list[Request]:
    """A pool with a broker Secret and a PodDisruptionBudget, plus a stale tier to delete."""
    api = RecordingApi()
    kube = Kube(api)  # type: ignore[arg-type]  # duck-typed ApiClient
    cache = FleetCache()
    pool = sample("pool-three-tiers.yaml", "CeleryWorkerPool")
    key = cache.put_pool(pool)
    stale = {
        "kind": "Deployment",
        "metadata": {
            "name": "billing-gone",
            "namespace": NAMESPACE,
            "labels": {POOL_LABEL: "billing"},
            "ownerReferences": [
                {"kind": "CeleryWorkerPool", "name": "billing", "uid": pool["metadata"]["uid"], "controller": True}
            ],
        },
        "spec": {"replicas": 1},
    }
    cache.put_child(POOL_LABEL, stale)
    outcome = PoolReconciler(kube, cache).reconcile(key)
    assert not outcome.error, api.calls
    kube.scale(NAMESPACE, "billing-high", 3)  # the autoscaler's one write
    return api.requests()


def _beat_requests() -> list[Request]:
    api = RecordingApi()
    kube = Kube(api)  # type: ignore[arg-type]  # duck-typed ApiClient
    cache = FleetCache()
    beat = sample("beat.yaml", "CeleryBeat")
    beat["spec"]["broker"] = {"urlSecretRef": {"name": "shop-broker", "key": "url"}}
    key = cache.put_beat(beat)
    outcome = BeatReconciler(kube, cache, "ghcr.io/celery-fleet/celery-fleet:0.1.0").reconcile(key)
    assert not outcome.error, api.calls
    return api.requests()


class TakenNamesApi(RecordingApi):
    """Every child name is taken by someone else's object: creates answer 409, GETs a stranger."""

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        body = kwargs.get("body") or {}
        if method == "PATCH" and (body.get("metadata") or {}).get("resourceVersion") == "1":
            self.calls.append((method, path, dict(kwargs.get("query_params") or []), "application/apply-patch+yaml"))
            raise ApiException(status=409, reason="Conflict")
        if method == "GET" and "/secrets/" not in path:
            self.calls.append((method, path, {}, ""))
            parts = path.split("/")
            return {"metadata": {"namespace": parts[-3], "name": parts[-1], "uid": "stranger"}}, 200, {}
        return super().call_api(path, method, **kwargs)


def _taken_names_requests() -> list[Request]:
    """Pool and beat whose child names are taken: the operator looks (GET) and writes nothing more."""
    api = TakenNamesApi()
    kube = Kube(api)  # type: ignore[arg-type]  # duck-typed ApiClient
    cache = FleetCache()
    pool_key = cache.put_pool(sample("pool-three-tiers.yaml", "CeleryWorkerPool"))
    beat = sample("beat.yaml", "CeleryBeat")
    beat_key = cache.put_beat(beat)
    assert PoolReconciler(kube, cache).reconcile(pool_key).error
    assert BeatReconciler(kube, cache, "ghcr.io/celery-fleet/celery-fleet:0.1.0").reconcile(beat_key).error
    applies = [c for c in api.calls if c[0] == "PATCH" and c[3] == "application/apply-patch+yaml"]
    assert applies and all("/status" not in c[1] for c in applies)
    return api.requests()


@pytest.mark.parametrize("mode", MODES)
def test_looking_at_a_taken_name_is_allowed(mode: rbac.Mode) -> None:
    requests = _taken_names_requests()
    rules = rbac.policy_rules(rbac.Scope.WATCHED, mode)
    refused = [r for r in requests if not allows(rules, r)]
    assert not refused, f"operator requests not granted by celery_fleet.rbac: {refused}"
    gets = {r.resource for r in requests if r.verb == "get"}
    assert {"deployments", "poddisruptionbudgets", "serviceaccounts"} <= gets, gets


def _verbs_seen(requests: list[Request]) -> set[tuple[str, str]]:
    return {(r.resource, r.verb) for r in requests}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gather", [_pool_requests, _beat_requests], ids=["pool", "beat"])
def test_every_request_of_a_reconcile_is_allowed(mode: rbac.Mode, gather: Any) -> None:
    requests = gather()
    rules = rbac.policy_rules(rbac.Scope.WATCHED, mode)
    refused = [r for r in requests if not allows(rules, r)]
    assert not refused, f"operator requests not granted by celery_fleet.rbac: {refused}"


def test_the_recorded_flows_exercise_every_kind_of_write() -> None:
    # Guards the test above: a reconcile that silently did nothing would pass it.
    seen = _verbs_seen(_pool_requests()) | _verbs_seen(_beat_requests())
    expected = {
        ("deployments", "patch"),
        ("deployments", "create"),
        ("deployments", "delete"),
        ("deployments/scale", "patch"),
        ("poddisruptionbudgets", "patch"),
        ("secrets", "get"),
        ("events", "create"),
        ("celeryworkerpools/status", "patch"),
        ("celerybeats/status", "patch"),
        ("serviceaccounts", "patch"),
        ("roles", "patch"),
        ("rolebindings", "patch"),
        ("leases", "patch"),
    }
    assert expected <= seen, f"not exercised: {expected - seen}"


def _watched_by_kopf() -> set[tuple[str, str]]:
    assert kopf_handlers.pool_event  # importing the module registers the handlers
    registry = kopf.get_default_registry()
    # Kopf keeps event handlers in its (private) watching registry; there is no public listing.
    found = set()
    for handler in registry._watching.get_all_handlers():
        selector = handler.selector
        assert selector is not None
        plural = selector.plural or selector.any_name
        found.add(("" if selector.group in (None, "v1") else selector.group, plural))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_every_kopf_watch_has_list_and_watch(mode: rbac.Mode) -> None:
    rules = rbac.policy_rules(rbac.Scope.WATCHED, mode)
    for group, plural in sorted(_watched_by_kopf()):
        for verb in ("list", "watch"):
            request = Request(verb, group, plural, "shop", None)
            assert allows(rules, request), f"Kopf watches {group}/{plural} but RBAC has no {verb}"


def test_list_and_watch_only_where_kopf_watches() -> None:
    # Reading every object of a kind is a broad grant: only for what a handler watches.
    watched = _watched_by_kopf()
    # The exceptions: scale-in lists a tier's pods and ReplicaSets (label-selected) once per
    # scale-down decision, to ask the workers of the pods its Deployment owns what they run; a
    # watch on every pod of the namespaces would cost more.
    listed_once = {("", "pods"), ("apps", "replicasets")}
    for rule in rbac.RULES:
        only_listed = set(rule.verbs) & {"list"} and not set(rule.verbs) & {"watch"}
        if only_listed and all((g, r) in listed_once | watched for g in rule.api_groups for r in rule.resources):
            continue
        if rule.scope is rbac.Scope.WATCHED and {"list", "watch"} & set(rule.verbs):
            for group in rule.api_groups:
                for resource in rule.resources:
                    assert (group, resource) in watched, f"{group}/{resource}: list/watch without a Kopf watch"


@pytest.mark.parametrize("mode", MODES)
def test_operator_holds_what_it_grants_to_beat_pods(mode: rbac.Mode) -> None:
    # RBAC refuses to create a Role that grants more than its creator holds (without escalate).
    rules = rbac.policy_rules(rbac.Scope.WATCHED, mode)
    role = beat_role("nightly", "shop", "uid")
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            for name in rule.get("resourceNames") or [None]:
                for resource in rule["resources"]:
                    request = Request(verb, rule["apiGroups"][0], resource, "shop", name)
                    assert allows(rules, request), f"beat Role grants {request} the operator lacks"


def test_no_dangerous_grants() -> None:
    for rule in rbac.RULES:
        assert "*" not in rule.verbs and "*" not in rule.resources and "*" not in rule.api_groups, rule
        assert not {"escalate", "bind", "impersonate"} & set(rule.verbs), rule
        if "secrets" in rule.resources:
            assert set(rule.verbs) == {"get"}, "Secrets: get by name only, never list/watch"
        assert rule.why.strip(), f"{rule.resources}: every rule says why"


@pytest.mark.parametrize("rule", rbac.RULES, ids=lambda r: f"{'+'.join(r.resources)}:{'+'.join(r.verbs)}")
def test_every_rule_names_code_that_exists(rule: rbac.Rule) -> None:
    assert rule.used_by, "a rule without the code that needs it cannot be reviewed"
    for reference in rule.used_by:
        assert rbac.resolve(reference) is not None


def test_secret_rule_narrows_to_named_secrets() -> None:
    mode = rbac.Mode(all_namespaces=False, resource_names={"rbac.brokerSecretNames": ["shop-broker"]})
    rules = rbac.policy_rules(rbac.Scope.WATCHED, mode)
    assert allows(rules, Request("get", "", "secrets", "shop", "shop-broker"))
    assert not allows(rules, Request("get", "", "secrets", "shop", "db-password"))


@pytest.mark.parametrize(
    ("method", "path", "query", "apply", "expected"),
    [
        pytest.param("GET", "/api/v1/namespaces/a/secrets/s", {}, False, [("get", "", "secrets", "s")], id="get"),
        pytest.param("GET", "/apis/apps/v1/deployments", {}, False, [("list", "apps", "deployments", None)], id="list"),
        pytest.param(
            "GET", "/apis/apps/v1/namespaces/a/deployments", {"watch": "true"}, False,
            [("watch", "apps", "deployments", None)], id="watch",
        ),
        pytest.param(
            "PATCH", "/apis/apps/v1/namespaces/a/deployments/d", {}, True,
            [("patch", "apps", "deployments", "d"), ("create", "apps", "deployments", "d")], id="apply-may-create",
        ),
        pytest.param(
            "PATCH", "/apis/apps/v1/namespaces/a/deployments/d/scale", {}, False,
            [("patch", "apps", "deployments/scale", "d")], id="subresource",
        ),
        pytest.param("POST", "/api/v1/namespaces/a/events", {}, False, [("create", "", "events", None)], id="create"),
        pytest.param(
            "DELETE", "/apis/policy/v1/namespaces/a/poddisruptionbudgets", {}, False,
            [("deletecollection", "policy", "poddisruptionbudgets", None)], id="deletecollection",
        ),
    ],
)  # fmt: skip
def test_request_attributes(
    method: str, path: str, query: dict[str, str], apply: bool, expected: list[tuple[str, str, str, str | None]]
) -> None:
    got = [(r.verb, r.api_group, r.resource, r.name) for r in requests_for(method, path, query, apply=apply)]
    assert got == expected


def test_generated_files_are_fresh() -> None:
    stale = generated.stale_files(ROOT, render.generated_files())
    assert not stale, f"{[str(p) for p in stale]}: {render.STALE_MESSAGE}"


def test_check_fails_with_the_fix_when_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generated.write_files(tmp_path, render.generated_files())
    assert render.main(["--check", "--root", str(tmp_path)]) == 0
    target = tmp_path / render.DEPLOY_RBAC
    target.write_text(target.read_text().replace('"patch"', '"patch", "update"', 1))
    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    assert render.STALE_MESSAGE in capsys.readouterr().err
    (tmp_path / render.CHART_RBAC).unlink()
    assert render.main(["--check", "--root", str(tmp_path)]) == 1


def test_deploy_rbac_is_the_cluster_wide_rules() -> None:
    docs = list(yaml.safe_load_all((ROOT / render.DEPLOY_RBAC).read_text()))
    users = {f"celery-fleet-{r.suffix}" for r in rbac.USER_ROLES}  # aggregated into admin/edit/view, bound by no one
    roles = {
        d["metadata"]["name"]: d["rules"]
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] not in users
    }
    assert roles == {
        "celery-fleet-cluster": rbac.policy_rules(rbac.Scope.CLUSTER, ALL),
        "celery-fleet": rbac.policy_rules(rbac.Scope.WATCHED, ALL),
    }
    bindings = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == set(roles)
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "celery-fleet", "namespace": "celery-fleet"}]
