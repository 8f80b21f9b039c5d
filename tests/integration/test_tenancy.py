"""Issue 13: one operator, many teams' namespaces, every team hostile to the others.

Item 1: object names cannot reach another namespace (admission, then the client itself).
Item 5: the operator never takes over an object of the same name that it did not create.
Item 9: a deleted pool's or beat's metrics go with it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from celery_fleet.kube.client import ApiError, Kube
from tests.support.cluster import Cluster
from tests.support.faults import (
    apply,
    beat_manifest,
    broker_secret,
    events,
    own_namespace,
    pool_manifest,
    push_backlog,
    tier,
    until_watched,
)
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

OTHER_PASSWORD = "other-teams-s3cret"
UNREACHABLE = {"url": "redis://127.0.0.1:1/0"}  # children do not need a broker


def _server_dry_run(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> str:
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    return proc.stderr if proc.returncode else ""


# -- item 1: path traversal --------------------------------------------------------------------------------

TRAVERSING_NAMES = [
    pytest.param(["broker"], {"urlSecretRef": {"name": "../../{other}/secrets/redis", "key": "url"}},
                 "spec.broker.urlSecretRef.name", id="broker-secret"),
    pytest.param(["serviceAccountName"], "../../{other}/serviceaccounts/default", "spec.serviceAccountName",
                 id="service-account"),
    pytest.param(["priorityClassName"], "../x", "spec.priorityClassName", id="priority-class"),
    pytest.param(["imagePullSecrets"], [{"name": "../../{other}/secrets/regcred"}], "spec.imagePullSecrets[0].name",
                 id="pull-secret"),
    pytest.param(["env"], [{"name": "U", "valueFrom": {"secretKeyRef": {"name": "../{other}", "key": "k"}}}],
                 "spec.env[0].valueFrom.secretKeyRef.name", id="env-secret"),
    pytest.param(["envFrom"], [{"configMapRef": {"name": "a/b"}}], "spec.envFrom[0].configMapRef.name",
                 id="env-from-config-map"),
    pytest.param(["volumes"], [{"name": "v", "secret": {"secretName": "../../{other}/secrets/redis"}}],
                 "spec.volumes[0].secret.secretName", id="volume-secret"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "field"), TRAVERSING_NAMES)
@pytest.mark.parametrize("kind", ["pool", "beat"])
def test_names_that_leave_the_namespace_are_refused_at_admission(
    cluster: Cluster, crds_installed: list[str], namespace: str, kind: str, path: list[str], value: Any, field: str
) -> None:
    broker = {"url": "redis://redis:6379/0"}
    obj = pool_manifest("shop", broker) if kind == "pool" else beat_manifest("shop", broker)
    obj["spec"][path[0]] = json.loads(json.dumps(value).replace("{other}", "team-b"))
    error = _server_dry_run(cluster, namespace, obj)
    assert field in error, error
    assert "Kubernetes object name" in error or "should match" in error, error


def test_the_client_cannot_be_made_to_read_another_namespace(
    cluster: Cluster, k8s_api: client.ApiClient, namespace: str
) -> None:
    """Bypassing admission: the name reaches the client as is, and stays one path segment."""
    kube = Kube(k8s_api)
    with own_namespace(cluster, "victim") as other:
        broker_secret(k8s_api, other, "redis", {"url": f"redis://:{OTHER_PASSWORD}@redis.{other}:6379/0"})
        traversal = f"../../{other}/secrets/redis"
        # The attack is real: an unescaped path climbs into the other namespace.
        raw = kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{traversal}")
        assert raw["metadata"]["namespace"] == other
        # Through the client it is one name in our own namespace: no such Secret, or not a valid name.
        for sneaky in (
            traversal,
            f"..%2F..%2F{other}%2Fsecrets%2Fredis",
            f"redis?namespace={other}",
            f"x/../../{other}",
        ):
            try:
                assert kube.secret_value(namespace, sneaky, "url") is None, sneaky
            except ApiError as err:
                assert err.status == 400 and OTHER_PASSWORD not in str(err), (sneaky, err)
        with pytest.raises(ValueError, match="not an object name"):
            kube.secret_value(namespace, "..", "url")
        assert kube.get("v1", "Secret", f"{namespace}/../{other}", "redis") is None


# -- item 5: no takeover by server-side apply --------------------------------------------------------------

# Someone else's objects, named as the operator would name its children (the Deployment even copies
# our labels, so the operator's watch sees it).
_USER_LABELS = {"team": "theirs"}
_COPIED_LABELS = {"app.kubernetes.io/managed-by": "celery-fleet", "celeryfleet.io/pool": "shop",
                  "celeryfleet.io/tier": "high"}  # fmt: skip


def _user_deployment(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"user": name}},
                     "template": {"metadata": {"labels": {"user": name}},
                                  "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}}  # fmt: skip


USER_OBJECTS = {
    "PodDisruptionBudget": lambda name: {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "labels": _USER_LABELS},
        "spec": {"minAvailable": 3, "selector": {"matchLabels": {"user": "theirs"}}}},
    "Deployment": lambda name: _user_deployment(name, {**_COPIED_LABELS, **_USER_LABELS}),
    "BeatDeployment": lambda name: _user_deployment(name, _USER_LABELS),
    "ServiceAccount": lambda name: {"apiVersion": "v1", "kind": "ServiceAccount",
                                    "metadata": {"name": name, "labels": _USER_LABELS}},
    "Role": lambda name: {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                          "metadata": {"name": name, "labels": _USER_LABELS},
                          "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
    "RoleBinding": lambda name: {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                 "metadata": {"name": name, "labels": _USER_LABELS},
                                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                             "name": "view"},
                                 "subjects": [{"kind": "ServiceAccount", "name": "default"}]},
    "Lease": lambda name: {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                           "metadata": {"name": name, "labels": _USER_LABELS},
                           "spec": {"holderIdentity": "their-leader", "leaseDurationSeconds": 3600}},
}  # fmt: skip


def _get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", kind.lower(), name, "-n", namespace, "-o", "json", "--show-managed-fields",
                           check=False)  # fmt: skip
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _untouched(cluster: Cluster, namespace: str, kind: str, name: str, before: dict[str, Any]) -> None:
    after = _get(cluster, namespace, kind, name)
    assert after is not None, f"{kind} {name} is gone"
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"].get("ownerReferences") is None, after["metadata"]
    managers = {m["manager"] for m in after["metadata"].get("managedFields") or []}
    assert "celery-fleet" not in managers, managers
    for field in ("spec", "rules", "roleRef", "subjects"):
        assert after.get(field) == before.get(field), field
    assert after["metadata"].get("labels") == before["metadata"].get("labels")


def _owner_condition(k8s_api: client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any]:
    obj = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
        "celeryfleet.io", "v1alpha1", namespace, plural, name
    )
    conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    return conds.get("Degraded") or {}


def _conflict_reported(
    cluster: Cluster, k8s_api: client.ApiClient, namespace: str, plural: str, owner: str, kind: str, name: str
) -> None:
    def reported() -> dict[str, Any] | None:
        cond = _owner_condition(k8s_api, namespace, plural, owner)
        return cond if cond.get("status") == "True" and cond.get("reason") == "ChildConflict" else None

    cond = wait_for(reported, timeout=60, message=lambda: f"ChildConflict on {owner}: "
                    f"{_owner_condition(k8s_api, namespace, plural, owner)}")  # fmt: skip
    assert f"{kind} {name} already exists" in cond["message"] and "Rename or delete" in cond["message"], cond
    warnings = wait_for(
        lambda: [e for e in events(k8s_api, namespace, owner) if e.reason == "ChildConflict" and e.type == "Warning"],
        timeout=30, message="a Warning Event ChildConflict",
    )  # fmt: skip
    assert f"{kind} {name}" in warnings[0].message


def _deleted_and_collected(
    cluster: Cluster, namespace: str, plural: str, owner: str, owned: list[tuple[str, str]]
) -> None:
    cluster.kubectl("delete", plural, owner, "-n", namespace)
    for kind, name in owned:
        wait_for(lambda k=kind, n=name: _get(cluster, namespace, k, n) is None, timeout=60,
                 message=f"garbage collection of our {kind} {name}")  # fmt: skip


POOL_CONFLICTS = [
    pytest.param("PodDisruptionBudget", "shop-high", id="pdb"),
    pytest.param("Deployment", "shop-high", id="deployment-with-copied-labels"),
]


@pytest.mark.parametrize(("kind", "name"), POOL_CONFLICTS)
def test_a_pool_never_takes_over_a_same_named_object(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, kind: str, name: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(USER_OBJECTS[kind](name)))
    before = _get(cluster, namespace, kind, name)
    assert before is not None
    pdb = {"podDisruptionBudget": {"maxUnavailable": 1}}
    tiers = [{**tier("high", "high_priority"), **pdb}, {**tier("low", "low_priority"), **pdb}]
    pool = pool_manifest("shop", UNREACHABLE, tiers)
    until_watched(cluster, namespace, lambda: apply(cluster, namespace, pool) == "" and
                  _get(cluster, namespace, "Deployment", "shop-low") is not None)  # fmt: skip
    _conflict_reported(cluster, k8s_api, namespace, "celeryworkerpools", "shop", kind, name)
    _untouched(cluster, namespace, kind, name, before)
    # The other tier is served as usual.
    assert _get(cluster, namespace, "PodDisruptionBudget", "shop-low") is not None
    owned = [("Deployment", "shop-low"), ("PodDisruptionBudget", "shop-low")]
    if kind == "PodDisruptionBudget":
        owned.append(("Deployment", "shop-high"))
    _deleted_and_collected(cluster, namespace, "celeryworkerpools", "shop", owned)
    _untouched(cluster, namespace, kind, name, before)


# Beat children in the order the operator writes them; a taken name stops everything after it.
BEAT_CHILDREN = [("ServiceAccount", "shop-beat"), ("Lease", "shop-beat"), ("Role", "shop-beat-lease"),
                 ("RoleBinding", "shop-beat-lease"), ("Deployment", "shop-beat")]  # fmt: skip


@pytest.mark.parametrize(("kind", "name"), BEAT_CHILDREN, ids=[k for k, _ in BEAT_CHILDREN])
def test_a_beat_never_takes_over_a_same_named_object(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, kind: str, name: str
) -> None:
    user = USER_OBJECTS["BeatDeployment" if kind == "Deployment" else kind](name)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(user))
    before = _get(cluster, namespace, kind, name)
    assert before is not None
    beat = beat_manifest("shop", UNREACHABLE)
    until_watched(cluster, namespace, lambda: apply(cluster, namespace, beat) == ""
                  and _owner_condition(k8s_api, namespace, "celerybeats", "shop").get("reason"))  # fmt: skip
    _conflict_reported(cluster, k8s_api, namespace, "celerybeats", "shop", kind, name)
    _untouched(cluster, namespace, kind, name, before)
    position = BEAT_CHILDREN.index((kind, name))
    for later_kind, later_name in BEAT_CHILDREN[position + 1 :]:
        assert _get(cluster, namespace, later_kind, later_name) is None, f"{later_kind} written after a conflict"
    _deleted_and_collected(cluster, namespace, "celerybeats", "shop", BEAT_CHILDREN[:position])
    _untouched(cluster, namespace, kind, name, before)


# -- item 9: a deleted pool's or beat's metrics go with it --------------------------------------------------


def _series(operator: OperatorProcess, namespace: str, **labels: str) -> list[str]:
    """Every sample line of this namespace's series that carries all `labels`."""
    wanted = [f'namespace="{namespace}"', *(f'{k}="{v}"' for k, v in labels.items())]
    return [line for line in operator.metrics().splitlines()
            if not line.startswith("#") and all(w in line for w in wanted)]  # fmt: skip


def test_metrics_of_deleted_pools_tiers_queues_and_beats_are_removed(
    cluster: Cluster,
    k8s_api: client.ApiClient,
    operator: OperatorProcess,
    namespace: str,
    redis_server: RedisServer,
    redis_db: Any,
) -> None:
    push_backlog(redis_db, "high_priority", 25)
    push_backlog(redis_db, "low_priority", 5)
    tiers = [tier("high", "high_priority"), {**tier("low", "low_priority"), "queues": ["low_priority", "bulk"]}]
    shop = {"url": redis_server.url}
    until_watched(cluster, namespace, lambda: apply(cluster, namespace, pool_manifest("shop", shop, tiers)) == ""
                  and _series(operator, namespace, pool="shop"))  # fmt: skip
    apply(cluster, namespace, pool_manifest("down", UNREACHABLE))  # its broker-unreachable gauge is what alerts read
    apply(cluster, namespace, beat_manifest("shop", UNREACHABLE))

    def every_series_present() -> bool:
        return bool(
            _series(operator, namespace, pool="shop", tier="low", queue_name="bulk")
            and [s for s in _series(operator, namespace, pool="shop", tier="high") if "scaling_decisions" in s]
            and [s for s in _series(operator, namespace, pool="down") if s.startswith("celery_fleet_broker_reachable")]
            and _series(operator, namespace, beat="shop")
        )

    wait_for(every_series_present, timeout=60, message=lambda: "\n".join(_series(operator, namespace)))
    assert any(s.endswith(" 0.0") for s in _series(operator, namespace, pool="down") if "broker_reachable" in s)

    # A queue leaves a tier, then a whole tier leaves the pool.
    tiers[1]["queues"] = ["low_priority"]
    apply(cluster, namespace, pool_manifest("shop", shop, tiers))
    wait_for(lambda: not _series(operator, namespace, pool="shop", queue_name="bulk"), timeout=30,
             message=lambda: "\n".join(_series(operator, namespace, queue_name="bulk")))  # fmt: skip
    assert _series(operator, namespace, pool="shop", tier="low", queue_name="low_priority")
    apply(cluster, namespace, pool_manifest("shop", shop, tiers[:1]))
    wait_for(lambda: not _series(operator, namespace, pool="shop", tier="low"), timeout=30,
             message=lambda: "\n".join(_series(operator, namespace, tier="low")))  # fmt: skip
    assert _series(operator, namespace, pool="shop", tier="high")

    # Deleted pools and beats: every series with their labels is gone.
    for plural, name in (("celeryworkerpools", "shop"), ("celeryworkerpools", "down"), ("celerybeats", "shop")):
        cluster.kubectl("delete", plural, name, "-n", namespace)
    wait_for(lambda: not _series(operator, namespace), timeout=30,
             message=lambda: "\n".join(_series(operator, namespace)))  # fmt: skip


# -- item 11: aggregated user roles, the NetworkPolicy --------------------------------------------------------


def _can(cluster: Cluster, user: str, verb: str, resource: str, namespace: str, *extra: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", verb, resource, "--as", user, "-n", namespace, *extra, check=False)
    return proc.stdout.strip() == "yes"


def test_aggregated_roles_let_namespace_admins_and_editors_manage_and_viewers_read(
    cluster: Cluster, crds_installed: list[str], namespace: str
) -> None:
    import uuid

    from celery_fleet.rbac import render, rules

    prefix = f"tenancy-{uuid.uuid4().hex[:6]}"  # ClusterRoles are cluster-wide: names of this test's own
    docs = render._user_role_docs(prefix, ["    app.kubernetes.io/part-of: celery-fleet-test"])
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(docs))
    try:
        for user, role in (("alice", "admin"), ("bob", "edit"), ("carol", "view")):
            cluster.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}",
                            "-n", namespace)  # fmt: skip
        pools, beats = "celeryworkerpools.celeryfleet.io", "celerybeats.celeryfleet.io"
        # The controller-manager's aggregation controller folds our rules into admin/edit/view.
        wait_for(lambda: _can(cluster, "bob", "create", pools, namespace), timeout=30, message="edit aggregated")
        wait_for(lambda: _can(cluster, "carol", "list", beats, namespace), timeout=30, message="view aggregated")
        for user in ("alice", "bob"):
            for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
                for resource in (pools, beats):
                    assert _can(cluster, user, verb, resource, namespace), (user, verb, resource)
        for verb in ("get", "list", "watch"):
            assert _can(cluster, "carol", verb, pools, namespace) and _can(cluster, "carol", verb, beats, namespace)
        for verb in ("create", "update", "patch", "delete"):
            assert not _can(cluster, "carol", verb, pools, namespace), verb
        # Nobody gets status writes (the operator's), and the grants stay in the namespace bound.
        assert not _can(cluster, "alice", "patch", pools, namespace, "--subresource=status")
        assert _can(cluster, "carol", "get", pools, namespace, "--subresource=status")
        with own_namespace(cluster, "elsewhere") as other:
            assert not _can(cluster, "alice", "list", pools, other)
        assert not _can(cluster, "dave", "list", pools, namespace)
    finally:
        for role in rules.USER_ROLES:
            cluster.kubectl("delete", "clusterrole", f"{prefix}-{role.suffix}", "--wait=false", check=False)


def test_the_charts_network_policy_is_accepted_by_the_apiserver(cluster: Cluster, namespace: str) -> None:
    from tests.unit.test_chart import helm, template_args

    text = helm(*template_args("--namespace", namespace, "--set", "networkPolicy.enabled=true",
                               "--show-only", "templates/networkpolicy.yaml")).stdout  # fmt: skip
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text, check=False)
    assert proc.returncode == 0 and "networkpolicy" in proc.stdout, proc.stderr
