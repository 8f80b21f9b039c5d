"""The operator's RBAC: every permission it holds, each beside the reason and the code that needs it.

:mod:`.rules` is the one source; :mod:`.render` (`python -m celery_fleet.rbac`) writes it into the Helm chart
(`charts/celery-fleet/templates/rbac.yaml`, templated for cluster-wide or a list of namespaces)
and the kustomize base (`deploy/rbac.yaml`, cluster-wide; plus `deploy/crds/`, a copy of the
generated CRDs, because kustomize refuses files outside its directory). `--check` compares them
with a fresh rendering and fails with "RBAC is stale: run make generate".

Least privilege, and why each choice:
- Only the verbs the code sends. Server-side apply is a PATCH, but a PATCH that creates the
  object is also authorized as `create`, so every applied kind gets both.
- Secrets: `get` only (no list/watch), in the watched namespaces only. RBAC cannot follow the
  Secret names that pools reference (they live in the pools' specs); the operator granting
  itself per-Secret Roles would need `escalate`, which is worse. When the names are known up
  front, the chart's `rbac.brokerSecretNames` narrows the rule to them.
- Beat Roles: the operator creates a Role granting `get`/`update` on one Lease. RBAC lets a
  subject create a Role only with permissions it holds itself (or with `escalate`, which would
  let it grant anything). So the operator holds `get`/`update` on leases where it works, a
  strict subset of what it can already do to Leases with `patch`, and never `escalate`/`bind`.
  Binding that Role needs no `bind` either, for the same reason.
- Children carry ownerReferences with blockOwnerDeletion; clusters that enforce
  OwnerReferencesPermissionEnforcement (OpenShift) then require `update` on the owner's
  `finalizers` subresource. The operator adds no finalizers itself.
- No Kopf peering objects (Kopf peering pauses peers of equal priority, so it is not leader
  election). Replicas elect the active one through a Lease in the operator's own namespace
  (`run --leader-elect`): a Role there, get/update/create on leases (create cannot be narrowed
  to a name; get/update are held cluster-wide anyway when every namespace is watched).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_fleet import GROUP


class Scope(enum.Enum):
    """Where a rule applies."""

    WATCHED = "watched"  # namespaced resources in the namespaces the operator serves
    CLUSTER = "cluster"  # cluster-scoped resources: always a ClusterRole
    # The operator's own namespace, with leader election only: a Role there (its Lease).
    OPERATOR_NAMESPACE = "operator-namespace"


class When(enum.Enum):
    """Install modes a rule is needed in (a rule with none is always needed)."""

    LISTED_NAMESPACES = "listed-namespaces"  # the operator watches a list of namespaces
    ALL_NAMESPACES = "all-namespaces"  # the operator watches every namespace


@dataclass(frozen=True)
class Rule:
    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    # "module:qualified.name" of the code that sends these requests; a unit test resolves each.
    used_by: tuple[str, ...]
    scope: Scope = Scope.WATCHED
    when: frozenset[When] = frozenset()
    # A chart value (list of names) that, when set, narrows the rule to those resourceNames.
    resource_names_value: str | None = None

    def as_policy_rule(self, resource_names: Sequence[str] = ()) -> dict[str, Any]:
        rule: dict[str, Any] = {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if resource_names:
            rule["resourceNames"] = list(resource_names)
        return rule


_POOL_RECONCILER = "celery_fleet.handlers.pool_reconciler:PoolReconciler"
_BEAT_RECONCILER = "celery_fleet.handlers.beat_reconciler:BeatReconciler"
_HANDLERS = "celery_fleet.handlers.kopf_handlers"

RULES: tuple[Rule, ...] = (
    # --- Kopf: the watches behind the operator's cache (list + watch per watched resource).
    Rule(
        (GROUP,),
        ("celeryworkerpools", "celerybeats"),
        ("list", "watch"),
        "Kopf watches the pools and beats (the operator's only trigger).",
        (f"{_HANDLERS}:pool_event", f"{_HANDLERS}:beat_event"),
    ),
    Rule(
        ("apps",),
        ("deployments",),
        ("list", "watch"),
        "Kopf watches the tier and beat Deployments (managed-by label) to see drift and readiness.",
        (f"{_HANDLERS}:deployment_event",),
    ),
    Rule(
        ("policy",),
        ("poddisruptionbudgets",),
        ("list", "watch"),
        "Kopf watches the tier PodDisruptionBudgets (managed-by label).",
        (f"{_HANDLERS}:pdb_event",),
    ),
    Rule(
        ("coordination.k8s.io",),
        ("leases",),
        ("list", "watch"),
        "Kopf watches the beat Leases (beat label) to report the leader.",
        (f"{_HANDLERS}:lease_event",),
    ),
    Rule(
        ("autoscaling",),
        ("horizontalpodautoscalers",),
        ("list", "watch"),
        "Kopf watches HPAs: one that targets a tier's Deployment holds that tier (ScalerConflict condition).",
        (f"{_HANDLERS}:hpa_event",),
    ),
    Rule(
        ("keda.sh",),
        ("scaledobjects",),
        ("list", "watch"),
        "Kopf watches KEDA ScaledObjects (once their CRD exists): one that targets a tier holds it, as an HPA.",
        (f"{_HANDLERS}:scaled_object_event",),
    ),
    # --- Status, Events, ownership.
    Rule(
        (GROUP,),
        ("celeryworkerpools/status", "celerybeats/status"),
        ("patch",),
        "Status (conditions, tiers, leader) is a merge patch of the status subresource.",
        ("celery_fleet.kube.client:Kube.patch_status", _POOL_RECONCILER, _BEAT_RECONCILER),
    ),
    Rule(
        (GROUP,),
        ("celeryworkerpools/finalizers", "celerybeats/finalizers"),
        ("update",),
        "Children are owned with blockOwnerDeletion, which OwnerReferencesPermissionEnforcement checks.",
        ("celery_fleet.planning.workload:owner_reference",),
    ),
    Rule(
        ("",),
        ("events",),
        ("create", "patch"),
        "An Event per scaling decision and child change (and Kopf's own warnings); patch counts a repeat on "
        "the Event already written.",
        ("celery_fleet.kube.events:post_event",),
    ),
    # --- Children, written with server-side apply (PATCH; create when absent).
    Rule(
        ("apps",),
        ("deployments",),
        ("create", "get", "patch", "delete"),
        "Tier and beat Deployments are applied; a tier removed from the spec has its Deployment deleted;"
        " get: whose is a same-named object found at create (never adopt it).",
        ("celery_fleet.kube.client:Kube.apply", "celery_fleet.kube.client:Kube.delete", _POOL_RECONCILER),
    ),
    Rule(
        ("apps",),
        ("deployments/scale",),
        ("patch",),
        "The autoscaler's only write: spec.replicas through the scale subresource.",
        ("celery_fleet.kube.client:Kube.scale", "celery_fleet.handlers.autoscaler.pool:PoolScaler"),
    ),
    Rule(
        ("policy",),
        ("poddisruptionbudgets",),
        ("create", "get", "patch", "delete"),
        "A PodDisruptionBudget per tier that asks for one; deleted when the tier stops asking; get: whose is"
        " a same-named object found at create.",
        ("celery_fleet.kube.client:Kube.apply", "celery_fleet.kube.client:Kube.delete", _POOL_RECONCILER),
    ),
    Rule(
        ("",),
        ("serviceaccounts",),
        ("create", "get", "patch"),
        "Each CeleryBeat gets a ServiceAccount for its elector (unless the spec names one); get: whose is"
        " a same-named object found at create.",
        ("celery_fleet.planning.beat_workload:beat_service_account", _BEAT_RECONCILER),
    ),
    Rule(
        ("rbac.authorization.k8s.io",),
        ("roles", "rolebindings"),
        ("create", "get", "patch"),
        "Each CeleryBeat gets a Role on its one Lease, bound to the beat pods' ServiceAccount; get: whose is"
        " a same-named object found at create.",
        (
            "celery_fleet.planning.beat_workload:beat_role",
            "celery_fleet.planning.beat_workload:beat_role_binding",
            _BEAT_RECONCILER,
        ),
    ),
    Rule(
        ("coordination.k8s.io",),
        ("leases",),
        ("create", "patch"),
        "Each CeleryBeat's Lease is created by the operator (the electors may not create).",
        ("celery_fleet.planning.beat_workload:beat_lease", _BEAT_RECONCILER),
    ),
    Rule(
        ("coordination.k8s.io",),
        ("leases",),
        ("get", "update"),
        "Held so the operator may grant them in the beat's Role (RBAC forbids granting more than"
        " one holds; the alternative, escalate, would let it grant anything); get also tells whose a"
        " same-named Lease found at create is.",
        ("celery_fleet.planning.beat_workload:beat_role",),
    ),
    Rule(
        ("",),
        ("pods",),
        ("list", "patch"),
        "Scale-in lists a tier's pods to ask their workers what they run, and sets "
        "controller.kubernetes.io/pod-deletion-cost on them so the ReplicaSet controller removes idle ones first.",
        (
            "celery_fleet.handlers.autoscaler.scale_in:ScaleIn.tier_pods",
            "celery_fleet.handlers.autoscaler.scale_in:ScaleIn.set_deletion_cost",
        ),
    ),
    Rule(
        ("apps",),
        ("replicasets",),
        ("list",),
        "Scale-in counts, asks and annotates only pods of a ReplicaSet that the tier's Deployment controls"
        " (by uid): labels can be copied by anyone who may create pods in the namespace.",
        ("celery_fleet.handlers.autoscaler.scale_in:ScaleIn.tier_pods",),
    ),
    Rule(
        ("",),
        ("secrets",),
        ("get",),
        "The broker URL of a pool or beat may come from a Secret (spec.broker.urlSecretRef); never listed.",
        ("celery_fleet.kube.client:Kube.secret_value", _POOL_RECONCILER, _BEAT_RECONCILER),
        resource_names_value="rbac.brokerSecretNames",
    ),
    Rule(
        ("",),
        ("configmaps",),
        ("get",),
        "The CA of a pool's TLS broker may come from a ConfigMap (spec.broker.tls.ca.configMapName); never listed.",
        ("celery_fleet.handlers.pool_reconciler:PoolReconciler._resolve_tls",),
    ),
    # --- Leader election between operator replicas (`run --leader-elect`), in the operator's namespace.
    Rule(
        ("coordination.k8s.io",),
        ("leases",),
        ("get", "update", "create"),
        "Replicas elect the active one through a Lease in the operator's namespace (created by the first).",
        (
            "celery_fleet.leader:run_elected",
            "celery_fleet.elector.lease_client:HttpLeaseApi.get",
            "celery_fleet.elector.lease_client:HttpLeaseApi.replace",
            "celery_fleet.elector.lease_client:HttpLeaseApi.create",
        ),
        scope=Scope.OPERATOR_NAMESPACE,
    ),
    # --- Kopf's discovery of namespaces and resources (cluster-scoped).
    Rule(
        ("apiextensions.k8s.io",),
        ("customresourcedefinitions",),
        ("list", "watch"),
        "Kopf notices the CRDs being installed or removed while it runs (GitOps may apply them later).",
        ("kopf._core.reactor.observation:resource_observer",),
        scope=Scope.CLUSTER,
    ),
    Rule(
        ("",),
        ("namespaces",),
        ("list", "watch"),
        "Kopf resolves the watched namespace names and notices them being created or deleted.",
        ("kopf._core.reactor.observation:namespace_observer",),
        scope=Scope.CLUSTER,
        when=frozenset({When.LISTED_NAMESPACES}),
    ),
)


# --- what users of the two kinds may do: aggregated into Kubernetes' default admin/edit/view roles
# (as KEDA and cert-manager do), so a namespace admin or editor manages pools and beats with no
# extra RoleBinding, and a viewer reads them.


@dataclass(frozen=True)
class UserRole:
    suffix: str  # ClusterRole name: <release>-<suffix>
    aggregate_to: tuple[str, ...]  # of admin, edit, view
    rules: tuple[dict[str, Any], ...]
    why: str


_KINDS = ["celeryworkerpools", "celerybeats"]
USER_ROLES: tuple[UserRole, ...] = (
    UserRole(
        "view",
        ("admin", "edit", "view"),
        (
            {
                "apiGroups": [GROUP],
                "resources": [*_KINDS, *(f"{k}/status" for k in _KINDS)],
                "verbs": ["get", "list", "watch"],
            },
        ),
        "Read pools and beats and their status: aggregated into view, edit and admin.",
    ),
    UserRole(
        "edit",
        ("admin", "edit"),
        (
            {
                "apiGroups": [GROUP],
                "resources": _KINDS,
                "verbs": ["create", "delete", "deletecollection", "patch", "update"],
            },
        ),
        "Create, change and delete pools and beats: aggregated into edit and admin (grants no more"
        " than edit has: pods as Deployments would make them; a beat's Role covers only its Lease).",
    ),
)


# --- evaluation (what a given install grants), used by the kustomize base and the tests


@dataclass(frozen=True)
class Mode:
    """One install: every namespace or a list of them."""

    all_namespaces: bool = True
    resource_names: Mapping[str, Sequence[str]] | None = None

    def holds(self, when: Iterable[When]) -> bool:
        facts = {
            When.ALL_NAMESPACES: self.all_namespaces,
            When.LISTED_NAMESPACES: not self.all_namespaces,
        }
        return all(facts[w] for w in when)


def policy_rules(scope: Scope, mode: Mode = Mode()) -> list[dict[str, Any]]:
    """The PolicyRules of one scope in one install mode."""
    names = mode.resource_names or {}
    return [
        r.as_policy_rule(names.get(r.resource_names_value or "", ()))
        for r in RULES
        if r.scope is scope and mode.holds(r.when)
    ]


def resolve(reference: str) -> object:
    """The object named by a `module:qualified.name` reference in `Rule.used_by`."""
    module_name, _, qualname = reference.partition(":")
    target: object = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        target = getattr(target, part)
    return target
