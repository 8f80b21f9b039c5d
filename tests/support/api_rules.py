"""Every validation rule the API declares (api.rules), where it sits, and its bad example in an object.

Shared by the unit test (the generated CRD carries exactly the declared rules; the models reject
each bad example in the rule's words) and the integration test (the real apiserver does too).
"""

from __future__ import annotations

import copy
import inspect
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from celery_fleet.api.models import (
    API_VERSION,
    BEAT_KIND,
    OBJECT_RULES,
    POOL_KIND,
    CeleryBeatSpec,
    CeleryWorkerPoolSpec,
)
from celery_fleet.api.rules import ListRules, Rule

SPECS: dict[str, type[BaseModel]] = {POOL_KIND: CeleryWorkerPoolSpec, BEAT_KIND: CeleryBeatSpec}


@dataclass(frozen=True)
class Declared:
    kind: str
    path: str  # schema path from the object's root, lists as `[]`: "spec.tiers[].replicas"; "" is the root
    rule: Rule
    on: Literal["object", "value"]  # a model's rule (bad: fields to set) or a field's (bad: its value)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.location()}:{self.rule.message[:70]}"

    def bad_object(self) -> dict[str, Any]:
        """A valid object of the kind with only this rule's bad example put in."""
        obj = base_object(self.kind)
        if self.on == "object":
            node = _node(obj, self.path)
            node.update(copy.deepcopy(self.rule.bad))
        else:
            parent_path, _, leaf = self.path.rpartition(".")
            parent = _node(obj, parent_path)
            if leaf.endswith("[]"):
                parent[leaf[:-2]] = [copy.deepcopy(self.rule.bad)]
            else:
                parent[leaf] = copy.deepcopy(self.rule.bad)
        return obj

    def location(self) -> str:
        """Where the apiserver and the models report the bad example (for a model's rule judged by
        the operator alone, the object it starts below)."""
        if self.on == "object":
            field = self.rule.field_path
        else:
            found = self.rule.find(self.rule.bad)
            assert found is not None, f"{self.id}: the bad example passes its own rule"
            field = found.field
        path = concrete(self.path)
        for part in field.split(".") if field else ():
            path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
        return path

    def reported_by_the_models(self, problems: list[str]) -> bool:
        """The models name the rule's field with the rule's message (values may follow in parentheses)."""
        where, message = self.location(), self.rule.message
        if self.on == "object" and self.rule.admission == "operator":
            return any(p.startswith(where) and f": {message}" in p for p in problems)
        return any(p == f"{where}: {message}" or p.startswith(f"{where}: {message} (") for p in problems)


def concrete(path: str) -> str:
    return path.replace("[]", "[0]")


# The rest of a valid node, where a rule's bad example goes below a node the base object lacks.
NODE_BASES: dict[str, dict[str, Any]] = {
    "spec.broker.urlSecretRef": {"key": "url"},
    "spec.podTemplate.spec.containers": {"name": "sidecar"},
    "spec.tiers.podTemplate.spec.containers": {"name": "sidecar"},
}


def _node(obj: dict[str, Any], path: str) -> dict[str, Any]:
    node: Any = obj
    at = ""
    for part in path.split(".") if path else ():
        key, is_list = (part[:-2], True) if part.endswith("[]") else (part, False)
        at = f"{at}.{key}" if at else key
        if is_list:
            # A list the base object lacks gets one item, the rest of a valid one.
            node = node.setdefault(key, [copy.deepcopy(NODE_BASES.get(at, {}))])[0]
        else:
            node = node.setdefault(key, copy.deepcopy(NODE_BASES.get(at, {})))
    assert isinstance(node, dict)
    return node


def base_object(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "app": "shop.celery:app",
        "image": "ghcr.io/example/celery-app:1.0",
        "broker": {"url": "redis://redis.celery.svc:6379/0"},
    }
    if kind == POOL_KIND:
        spec["tiers"] = [
            {"name": "high", "queues": ["high_priority"], "concurrency": 4, "replicas": {"min": 2, "max": 8}},
            {"name": "low", "queues": ["low_priority"], "concurrency": 2, "replicas": {"min": 1, "max": 4}},
        ]
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "bad"}, "spec": spec}


def _rules_of(meta: Any) -> tuple[Rule, ...]:
    if isinstance(meta, Rule):
        return (meta,)
    if isinstance(meta, ListRules):
        return meta.rules
    return ()


def declared_rules(kind: str) -> list[Declared]:
    """Every rule reachable from the kind's spec, with its schema path, in declaration order."""
    found = [Declared(kind, "", r, "object") for r in OBJECT_RULES]

    def walk_model(model: type[BaseModel], path: str) -> None:
        found.extend(Declared(kind, path, r, "object") for r in getattr(model, "RULES", ()))
        for name, info in model.model_fields.items():
            field_path = f"{path}.{info.alias or name}"
            for meta in info.metadata:
                found.extend(Declared(kind, field_path, r, "value") for r in _rules_of(meta))
            walk_type(info.annotation, field_path)

    def walk_type(tp: Any, path: str) -> None:
        origin = get_origin(tp)
        if origin is Annotated:
            base, *metas = get_args(tp)
            for meta in metas:
                found.extend(Declared(kind, path, r, "value") for r in _rules_of(meta))
            walk_type(base, path)
        elif origin is list:
            walk_type(get_args(tp)[0], path + "[]")
        elif origin in (Union, types.UnionType):
            for arg in get_args(tp):
                walk_type(arg, path)
        elif inspect.isclass(tp) and issubclass(tp, BaseModel):
            walk_model(tp, path)

    walk_model(SPECS[kind], "spec")
    return found


def all_declared() -> list[Declared]:
    """Both kinds; a rule the beat shares with the pool (broker, pod fields) is listed once, for the pool."""
    pool = declared_rules(POOL_KIND)
    seen = {(d.path, id(d.rule)) for d in pool}
    return pool + [d for d in declared_rules(BEAT_KIND) if (d.path, id(d.rule)) not in seen]


def schema_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, str]]]:
    """Every `x-kubernetes-validations` entry of a CRD schema, with its schema path."""
    found = [(path, entry) for entry in schema.get("x-kubernetes-validations", [])]
    for name, prop in schema.get("properties", {}).items():
        found += schema_rules(prop, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        found += schema_rules(schema["items"], path + "[]")
    return found


def schema_node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split(".") if path else ():
        key, is_list = (part[:-2], True) if part.endswith("[]") else (part, False)
        node = node["properties"][key]
        if is_list:
            node = node["items"]
    return node


def pattern_path(declared: Declared) -> str:
    """Schema path of the string a `pattern` rule judges inside a pass-through list's items."""
    found = declared.rule.find(declared.rule.bad)
    assert found is not None and found.field is not None
    _, _, inner = found.field.partition(".")  # "0.valueFrom.secretKeyRef.name": item 0, then the path
    return f"{declared.path}[].{inner}"
