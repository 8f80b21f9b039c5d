"""Issue 13 item 11: the chart ships aggregated user ClusterRoles and an optional NetworkPolicy.

Rendered with the real helm here; tests/integration/test_tenancy.py applies the roles to the real
apiserver and asks it what a namespace admin, editor and viewer may do.
"""

from __future__ import annotations

import pytest

from celery_fleet.rbac import render, rules
from tests.unit.test_chart import RELEASE, find, helm, one, rendered, template_args


def test_aggregated_roles_ship_by_default_with_the_labels_kubernetes_aggregates() -> None:
    docs = rendered()
    view = one(docs, "ClusterRole", f"{RELEASE}-view")
    edit = one(docs, "ClusterRole", f"{RELEASE}-edit")
    labels = {k: v for k, v in view["metadata"]["labels"].items() if k.startswith("rbac.authorization.k8s.io/")}
    assert labels == {f"rbac.authorization.k8s.io/aggregate-to-{r}": "true" for r in ("admin", "edit", "view")}
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert "delete" in edit["rules"][0]["verbs"]
    # The same roles, from the same source, in the kustomize base.
    assert [r.suffix for r in rules.USER_ROLES] == ["view", "edit"]
    assert "celery-fleet-edit" in render.render_deploy_rbac()


def test_aggregated_roles_can_be_left_out() -> None:
    docs = rendered("--set", "rbac.aggregateClusterRoles=false")
    assert not find(docs, "ClusterRole", f"{RELEASE}-view") and not find(docs, "ClusterRole", f"{RELEASE}-edit")


def test_network_policy_on_by_default_and_can_be_turned_off() -> None:
    # Issue 24 item 5: /metrics shows every tenant's queues; closed to all but monitoring by default.
    assert one(rendered(), "NetworkPolicy")["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert not find(rendered("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_network_policy_admits_only_metrics_from_the_chosen_namespace() -> None:
    docs = rendered("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.metrics.namespace=observability",
                    "--set", "networkPolicy.metrics.podSelector.app=prometheus")  # fmt: skip
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                             "podSelector": {"app": "prometheus"}}]  # fmt: skip
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "http-metrics" in ports


def test_network_policy_with_no_scraper_admits_nothing_and_egress_when_listed() -> None:
    egress = '[{"to":[{"ipBlock":{"cidr":"10.0.0.0/8"}}]}]'
    docs = rendered("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.metrics.namespace=",
                    "--set-json", f"networkPolicy.egress={egress}")  # fmt: skip
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"] is None or policy["spec"]["ingress"] == []
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(("--set", "networkPolicy.metrics.namespace=Not_A_Namespace"), id="bad-namespace"),
        pytest.param(("--set", "networkPolicy.unknown=1"), id="unknown-key"),
        pytest.param(("--set", "rbac.aggregateClusterRoles=maybe"), id="not-boolean"),
    ],
)
def test_the_values_schema_refuses_bad_values(values: tuple[str, ...]) -> None:
    proc = helm(*template_args(*values), check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
