"""Issue 24 item 5 in the chart: the broker destination policy and the metric series caps reach the
operator's flags, the values schema refuses what the operator would refuse, and /metrics of both
replicas (leader and standby) is closed by default, in the chart and the kustomize base alike.

Rendered with the real helm; tests/integration/test_broker_policy.py runs the operator with the flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from celery_fleet import metrics
from celery_fleet.cli import build_parser
from celery_fleet.planning.broker_policy import BrokerPolicy, check_destination
from tests.unit.test_chart import CUSTOM, ROOT, helm, one, rendered, template_args


def _args(*values: str) -> list[str]:
    (container,) = one(rendered(*values), "Deployment")["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def test_defaults_cap_series_and_add_no_policy_entries() -> None:
    args = _args()
    assert f"--metrics-max-series-per-pool={metrics.DEFAULT_SERIES_PER_POOL}" in args
    assert f"--metrics-max-series-per-namespace={metrics.DEFAULT_SERIES_PER_NAMESPACE}" in args
    assert not [a for a in args if a.startswith(("--broker-allow", "--broker-deny"))]


def test_policy_values_become_flags_the_operator_parses_into_the_same_policy() -> None:
    args = _args(*CUSTOM)
    assert args.count("--broker-allow=10.20.0.0/16") == 1 and "--broker-allow=*.redis.example.com" in args
    assert "--broker-deny=0.0.0.0/0" in args and "--broker-deny=::/0" in args
    assert "--metrics-max-series-per-pool=200" in args and "--metrics-max-series-per-namespace=0" in args
    parsed = build_parser().parse_args(args)
    policy = BrokerPolicy.build(parsed.broker_allow, parsed.broker_deny)
    assert check_destination("a.redis.example.com", ["10.20.1.1"], policy).allowed
    assert not check_destination("a.redis.example.com", ["10.30.1.1"], policy).allowed
    assert not check_destination("other.example.com", ["10.20.1.1"], policy).allowed


def test_the_pod_ip_reaches_the_operator_to_be_refused_as_a_broker() -> None:
    (container,) = one(rendered(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]


def test_network_policy_selects_both_replicas_and_admits_only_metrics() -> None:
    docs = rendered()
    policy, deployment = one(docs, "NetworkPolicy"), one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2  # leader and standby: the same pod template, the same policy
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert [r["ports"] for r in policy["spec"]["ingress"]] == [[{"port": "http-metrics", "protocol": "TCP"}]]


def test_the_kustomize_base_ships_the_same_network_policy() -> None:
    base = yaml.safe_load((ROOT / "deploy" / "networkpolicy.yaml").read_text())
    chart = one(rendered(), "NetworkPolicy")
    assert base["spec"] == chart["spec"] and base["metadata"]["name"] == chart["metadata"]["name"]
    kustomization = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    assert "networkpolicy.yaml" in kustomization["resources"]
    assert Path(ROOT / "deploy" / "networkpolicy.yaml").is_file()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(("--set-json", 'brokerPolicy.allowed=["http://x"]'), id="url-not-a-destination"),
        pytest.param(("--set-json", 'brokerPolicy.denied=["a b"]'), id="space"),
        pytest.param(("--set", "metrics.maxSeriesPerPool=-1"), id="negative-cap"),
        pytest.param(("--set", "brokerPolicy.unknown=1"), id="unknown-key"),
    ],
)
def test_the_values_schema_refuses_bad_policy_values(values: tuple[str, ...]) -> None:
    proc = helm(*template_args(*values), check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
