"""api.sharing: pools parsed from one template hold one copy of each equal nested model, and only
models that are equal in every field, type and set-ness are ever the same object."""

from __future__ import annotations

import gc
from typing import Any

from celery_fleet.api.models import parse_pool
from celery_fleet.api.sharing import ModelTable, share_submodels


def _pool(queue: str, *, max_replicas: int = 4, **more: Any) -> dict[str, Any]:
    autoscaling: dict[str, Any] = {"targetDepthPerReplica": 10, **more}
    tier = {
        "name": "high",
        "queues": [queue],
        "concurrency": 2,
        "replicas": {"min": 1, "max": max_replicas},
        "autoscaling": autoscaling,
    }
    return {"app": "a:app", "image": "img:1", "broker": {"url": "redis://r:6379/0"}, "tiers": [tier]}


def test_equal_nested_models_of_two_pools_are_one_object() -> None:
    table = ModelTable()
    a = share_submodels(parse_pool(_pool("q1")), table)
    b = share_submodels(parse_pool(_pool("q2")), table)
    assert a == parse_pool(_pool("q1")) and b == parse_pool(_pool("q2"))  # nothing lost or changed
    assert a.tiers[0].autoscaling is b.tiers[0].autoscaling
    assert a.tiers[0].replicas is b.tiers[0].replicas
    assert a.broker is b.broker
    assert a.tiers[0] is not b.tiers[0]  # their queues differ


def test_models_that_differ_in_a_value_or_in_what_was_set_are_not_shared() -> None:
    table = ModelTable()
    base = share_submodels(parse_pool(_pool("q")), table)
    other_max = share_submodels(parse_pool(_pool("q", max_replicas=5)), table)
    assert other_max.tiers[0].replicas is not base.tiers[0].replicas
    # activationDepth set to its default value is not the same model as it left unset (model_fields_set)
    default = parse_pool(_pool("q")).tiers[0].autoscaling.activation_depth
    explicit = share_submodels(parse_pool(_pool("q", activationDepth=default)), table)
    assert explicit.tiers[0].autoscaling is not base.tiers[0].autoscaling
    assert explicit.tiers[0].autoscaling.model_fields_set != base.tiers[0].autoscaling.model_fields_set


def test_a_model_no_pool_holds_leaves_the_table() -> None:
    table = ModelTable()
    share_submodels(parse_pool(_pool("q")), table)  # dropped at once
    gc.collect()
    assert len(table) == 0
