"""Every declared validation rule against the real apiserver: its bad example is refused with the
rule's message at the rule's field, as the models refuse it (or, for a rule the declaration says
the apiserver cannot run, accepted by it and refused by the models)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_fleet.api.models import GROUP, POOL_KIND, VERSION, InvalidSpec, parse_beat, parse_pool
from tests.support.api_rules import Declared, all_declared

pytestmark = pytest.mark.integration

PLURALS = {POOL_KIND: "celeryworkerpools"}


def dry_run_create(k8s_api: Any, namespace: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The apiserver's Status when it refuses `obj` (a dry run), None when it accepts it."""
    from kubernetes import client

    plural = PLURALS.get(obj["kind"], "celerybeats")
    try:
        client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, obj, dry_run="All", field_validation="Strict"
        )
    except client.ApiException as error:
        status: dict[str, Any] = json.loads(error.body)
        return status
    return None


def apiserver_agrees(declared: Declared, status: dict[str, Any] | None) -> str | None:
    """None when the apiserver judged the bad example as the declaration says, else what it did."""
    rule = declared.rule
    if rule.admission == "operator":
        return None if status is None else f"refused what only the operator judges: {status['message']}"
    if status is None:
        return "accepted it"
    causes = status.get("details", {}).get("causes", [])
    expected = rule.message if rule.admission == "cel" else f"should match '{rule.pattern}'"
    if any(c.get("field") == declared.location() and expected in c.get("message", "") for c in causes):
        return None
    return f"no cause at {declared.location()} with {expected!r}: {json.dumps(causes)}"


def test_every_rule_is_judged_alike_by_the_apiserver_and_the_models(
    k8s_api: Any, crds_installed: list[str], namespace: str
) -> None:
    declared = all_declared()
    wrong = []
    for d in declared:
        obj = d.bad_object()
        disagreement = apiserver_agrees(d, dry_run_create(k8s_api, namespace, obj))
        try:
            (parse_pool if obj["kind"] == POOL_KIND else parse_beat)(obj)
            problems: list[str] = []
        except InvalidSpec as err:
            problems = err.problems
        if not d.reported_by_the_models(problems):
            disagreement = (disagreement or "") + f" models: {problems}"
        if disagreement:
            wrong.append(f"{d.id}: {disagreement}")
    assert not wrong, "\n".join(wrong)
    assert len(declared) >= 40


# Issue 23 item 3: every spelling Click accepts of an option the model depends on, and lookalikes it does not.
SPELLINGS = [
    (["-n", "worker@%h"], "-n/--hostname"),
    (["-nworker@%h"], "-n/--hostname"),
    (["--hostname=worker@%h"], "-n/--hostname"),
    (["-Ec", "8"], "-c/--concurrency"),
    (["-c8"], "-c/--concurrency"),
    (["--queues", "a"], "-Q/--queues"),
    (["-X", "a"], "-X/--exclude-queues"),
    (["--pool=threads"], "-P/--pool"),
    (["--prefetch-multiplier", "4"], "--prefetch-multiplier"),
    (["--disable-prefetch"], "--disable-prefetch"),
    (["--autoscale=4,1"], "--autoscale"),
]
LOOKALIKES = [["-lwarning", "-Ofair", "--hostnames", "-E", "--", "worker_max_tasks_per_child=9"]]


def test_worker_options_in_extra_args_are_refused_at_admission_naming_the_field(
    k8s_api: Any, crds_installed: list[str], namespace: str
) -> None:
    from tests.support.api_rules import base_object

    wrong = []
    for args, option in SPELLINGS:
        obj = base_object(POOL_KIND)
        obj["spec"]["tiers"][1]["extraArgs"] = ["--without-mingle", *args]
        status = dry_run_create(k8s_api, namespace, obj)
        causes = (status or {}).get("details", {}).get("causes", [])
        where = "spec.tiers[1].extraArgs[1]"
        if not any(c.get("field") == where and f"{option} is set by the operator" in c["message"] for c in causes):
            wrong.append(f"{args}: {json.dumps(causes) if status else 'accepted'}")
    for args in LOOKALIKES:
        obj = base_object(POOL_KIND)
        obj["spec"]["tiers"][0]["extraArgs"] = args
        status = dry_run_create(k8s_api, namespace, obj)
        if status is not None:
            wrong.append(f"{args}: refused: {status['message']}")
    assert not wrong, "\n".join(wrong)
