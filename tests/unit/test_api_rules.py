"""Each validation rule is declared once (api.rules) and both sides come from it: the generated CRD
carries exactly the declared CEL rules (and patterns), and the models reject every rule's bad example
in the rule's words."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from celery_fleet.api import crdgen
from celery_fleet.api.models import BEAT_KIND, POOL_KIND, InvalidSpec, parse_beat, parse_pool
from celery_fleet.api.rules import Expr, cmp, is_set, matches, re2, unset, when_set
from tests.support.api_rules import (
    Declared,
    all_declared,
    base_object,
    declared_rules,
    pattern_path,
    schema_node,
    schema_rules,
)

FILES = {POOL_KIND: crdgen.POOL_FILE, BEAT_KIND: crdgen.BEAT_FILE}


def root_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = crdgen.generate_crds()[FILES[kind]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def problems(obj: dict[str, Any]) -> list[str]:
    parse = parse_pool if obj["kind"] == POOL_KIND else parse_beat
    with pytest.raises(InvalidSpec) as caught:
        parse(obj)
    return caught.value.problems


@pytest.mark.parametrize("kind", [POOL_KIND, BEAT_KIND])
def test_the_crd_carries_exactly_the_declared_cel_rules(kind: str) -> None:
    declared = Counter(
        (d.path, tuple(sorted(d.rule.x_validation().items())))
        for d in declared_rules(kind)
        if d.rule.admission == "cel"
    )
    generated = Counter((path, tuple(sorted(entry.items()))) for path, entry in schema_rules(root_schema(kind)))
    assert generated == declared


@pytest.mark.parametrize("kind", [POOL_KIND, BEAT_KIND])
def test_rules_that_are_not_cel_say_why_and_patterns_reach_the_crd(kind: str) -> None:
    for d in declared_rules(kind):
        if d.rule.admission == "cel":
            assert d.rule.cel and not d.rule.why, d.id
            continue
        assert d.rule.cel is None and d.rule.why, d.id
        if d.rule.admission == "pattern":
            node = schema_node(root_schema(kind), pattern_path(d))
            assert node["pattern"] == d.rule.pattern, d.id


def test_there_are_rules_of_every_form() -> None:
    declared = all_declared()
    assert len(declared) >= 40
    assert {d.rule.admission for d in declared} == {"cel", "pattern", "operator"}
    assert len({d.id for d in declared}) == len(declared)


@pytest.mark.parametrize("declared", [pytest.param(d, id=d.id) for d in all_declared()])
def test_the_models_reject_each_bad_example_in_the_rules_words(declared: Declared) -> None:
    found = problems(declared.bad_object())
    assert declared.reported_by_the_models(found), (declared.location(), found)


@pytest.mark.parametrize("kind", [POOL_KIND, BEAT_KIND])
def test_the_base_objects_are_valid(kind: str) -> None:
    (parse_pool if kind == POOL_KIND else parse_beat)(base_object(kind))


# -- the expression forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "cel"),
    [
        pytest.param(is_set("a.b"), "has(self.a) && has(self.a.b)", id="is-set-nested"),
        pytest.param(~(is_set("a") & is_set("b")), "!(has(self.a) && has(self.b))", id="not-both"),
        pytest.param(unset("a") | ~matches("x", "a"), "!has(self.a) || !self.a.matches('x')", id="implication"),
        pytest.param(
            when_set(["f"], cmp("f", ">=", "lo") & cmp("f", "<=", "hi")),
            "!has(self.f) || (self.f >= self.lo && self.f <= self.hi)",
            id="guarded-range",
        ),
        pytest.param(matches(r"^[^,\t]+$"), "self.matches('^[^,\\\\t]+$')", id="escaped-literal"),
    ],
)
def test_expressions_spell_cel(expr: Expr, cel: str) -> None:
    assert expr.cel == cel


@pytest.mark.parametrize(
    ("pattern", "text", "matched"),
    [
        pytest.param("^[a-z]+$", "abc", True, id="plain"),
        pytest.param("^[a-z]+$", "abc\n", False, id="dollar-is-the-very-end-as-in-re2"),
        pytest.param("^[0-9]+$", "١٢", False, id="ascii-digits-as-in-re2"),
        pytest.param("[?&]password=", "redis://r?password=x", True, id="unanchored-search"),
    ],
)
def test_patterns_judge_as_cel_matches_does(pattern: str, text: str, matched: bool) -> None:
    assert (re2(pattern).search(text) is not None) is matched


def test_whitespace_classes_must_be_spelled_out() -> None:
    with pytest.raises(ValueError, match="spell whitespace out"):
        re2(r"^[^\s]+$")


# -- names the operator sets itself ------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        pytest.param(
            POOL_KIND,
            {"env": [{"name": "CELERY_BROKER_URL", "value": "redis://x"}]},
            "spec.env[0].name: CELERY_BROKER_URL is set by the operator (from spec.broker); remove it from spec.env",
            id="broker-url",
        ),
        pytest.param(
            POOL_KIND,
            {"env": [{"name": "A", "value": "1"}, {"name": "POD_NAME", "value": "x"}]},
            "spec.env[1].name: POD_NAME is set by the operator (from the downward API)",
            id="pod-name",
        ),
        pytest.param(
            POOL_KIND,
            {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "A", "value": "3"}]},
            "spec.env[2].name: is already set by an earlier entry of spec.env; keep one of them (got A, as in entry 0)",
            id="duplicate",
        ),
        pytest.param(POOL_KIND, {"env": [{"value": "1"}]}, "spec.env[0].name: required", id="nameless"),
        pytest.param(
            BEAT_KIND,
            {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "celery-fleet", "emptyDir": {}}]},
            "spec.volumes: volume name celery-fleet is used by the operator for the beat pods; rename the volume "
            "(in volumes[1])",
            id="elector-volume-name",
        ),
        pytest.param(
            BEAT_KIND,
            {"volumes": [{"name": "x", "emptyDir": {}}], "volumeMounts": [{"name": "x", "mountPath": "/celery-beat"}]},
            "spec.volumeMounts: mount path /celery-beat is used by the operator",
            id="schedule-mount-path",
        ),
        pytest.param(
            BEAT_KIND,
            {"env": [{"name": "POD_NAMESPACE", "value": "other"}]},
            "spec.env[0].name: POD_NAMESPACE is set by the operator",
            id="beat-env",
        ),
    ],
)
def test_names_the_operator_sets_are_rejected_by_the_models(kind: str, fields: dict[str, Any], message: str) -> None:
    obj = base_object(kind)
    obj["spec"].update(fields)
    assert any(p.startswith(message) for p in problems(obj)), problems(obj)


def test_a_pool_volume_may_use_the_beat_names() -> None:
    obj = base_object(POOL_KIND)
    obj["spec"]["volumes"] = [{"name": "celery-fleet", "emptyDir": {}}]
    parse_pool(obj)
