"""Validation rules, each declared once: the apiserver's CEL rule and the models' check come from it.

A `Rule` is built from a small expression (`Expr`) that knows both its CEL text and its Python
test, so the two cannot drift; its message names the field and the fix and is the same on both
sides (the models may add the offending values after it, in parentheses). Attach a rule to a
model (`RULES = (...)` on a `_Spec` model: CEL on the object, checked after the fields) or to a
field (`Annotated[str, rule]`: CEL on the value, checked after, or with `raw`, before, pydantic
converts it).

Where the apiserver cannot run a rule as CEL within its cost budget (inside the unbounded
pass-through lists of Kubernetes objects), the rule says how it is enforced instead: `pattern`
(an OpenAPI pattern, whose message is the apiserver's own) or `operator` (the models only; the
operator reports it as Degraded/InvalidSpec), with the reason in `why`.

Regular expressions are written in the dialect CEL's `matches` uses (RE2, unanchored search);
the Python side compiles them so they judge the same: ASCII classes and `$` only at the very end.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

RULE_ERROR = "celeryfleet_rule"

Admission = Literal["cel", "pattern", "operator"]


# ---------------------------------------------------------------------------------------------
# Expressions: one CEL text and one Python test
# ---------------------------------------------------------------------------------------------


@functools.cache
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


@functools.cache
def _attribute(model: type[BaseModel], wire: str) -> str:
    """The Python name of a model's field from its wire name (rules are checked on every parse)."""
    return next((name for name, info in model.model_fields.items() if (info.alias or name) == wire), wire)


def value_at(node: Any, path: str) -> Any:
    """The value at a dotted path of wire (camelCase) names below a model or a plain mapping."""
    for part in _parts(path):
        if isinstance(node, BaseModel):
            node = getattr(node, _attribute(type(node), part), None)
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
    return node


def _self(path: str) -> str:
    return f"self.{path}" if path else "self"


def cel_string(text: str) -> str:
    """A single-quoted CEL string literal; characters other than printable ASCII as `\\uXXXX`."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in escaped) + "'"


def re2(pattern: str) -> re.Pattern[str]:
    """Compile a CEL (RE2) pattern so Python's `search` judges as CEL's `matches` does."""
    if "\\s" in pattern:
        raise ValueError(f"{pattern!r}: spell whitespace out ([\\t\\n\\f\\r ]): RE2's \\s is not Python's")
    # RE2's `$` (no multi-line flag) is the end of the text; Python's also matches before a final "\n".
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern), re.ASCII)


@dataclass(frozen=True)
class Expr:
    """A boolean expression over `self` (a model or a value): CEL text and a Python test."""

    cel: str
    test: Callable[[Any], bool]
    op: str = ""  # "" atomic (a call, a field), "cmp" a comparison, "&&" or "||": decides parentheses

    def _operand(self, op: str) -> str:
        return f"({self.cel})" if self.op in ("&&", "||") and self.op != op else self.cel

    def __and__(self, other: Expr) -> Expr:
        return Expr(f"{self._operand('&&')} && {other._operand('&&')}", lambda n: self.test(n) and other.test(n), "&&")

    def __or__(self, other: Expr) -> Expr:
        return Expr(f"{self._operand('||')} || {other._operand('||')}", lambda n: self.test(n) or other.test(n), "||")

    def __invert__(self) -> Expr:
        return Expr(f"!({self.cel})" if self.op else f"!{self.cel}", lambda n: not self.test(n))


def is_set(path: str) -> Expr:
    """The field (and every field above it) is present: CEL `has`, Python not None."""
    parts = path.split(".")
    cel = " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    return Expr(cel, lambda n: value_at(n, path) is not None, "&&" if len(parts) > 1 else "")


def unset(path: str) -> Expr:
    """Some field on the path is absent, spelled `!has(a) || !has(a.b)`."""
    parts = path.split(".")
    cel = " || ".join(f"!has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    return Expr(cel, lambda n: value_at(n, path) is None, "||" if len(parts) > 1 else "")


def is_true(path: str) -> Expr:
    return is_set(path) & Expr(f"self.{path}", lambda n: value_at(n, path) is True)


def matches(pattern: str, path: str = "") -> Expr:
    compiled = re2(pattern)

    def test(node: Any) -> bool:
        text = value_at(node, path)
        return isinstance(text, str) and compiled.search(text) is not None

    return Expr(f"{_self(path)}.matches({cel_string(pattern)})", test)


def none_of(path: str, values: Sequence[str]) -> Expr:
    """The string at `path` is none of `values` (`!=` each: cheap enough for CEL in unbounded lists)."""
    cel = " && ".join(f"self.{path} != {cel_string(v)}" for v in values)
    return Expr(cel, lambda n: value_at(n, path) not in values, "&&" if len(values) > 1 else "cmp")


def no_item_with(path: str, key: str, values: Sequence[str]) -> Expr:
    """No item of the list at `path` has its `key` in `values`."""
    names = " && ".join(f"x.{key} != {cel_string(v)}" for v in values)
    cel = f"!has(self.{path}) || self.{path}.all(x, !has(x.{key}) || {names if len(values) == 1 else f'({names})'})"
    return Expr(cel, lambda n: all(value_at(x, key) not in values for x in value_at(n, path) or ()), "||")


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def cmp(a: str, op: str, b: str) -> Expr:
    """`self.a op self.b` (both set; guard with `unset` where they may not be)."""
    compare = _COMPARE[op]
    return Expr(f"self.{a} {op} self.{b}", lambda n: compare(value_at(n, a), value_at(n, b)), "cmp")


def when_set(paths: Sequence[str], then: Expr) -> Expr:
    """`then`, judged only when every path is set (CEL: `!has(a) || ... || then`)."""
    guard: Expr | None = None
    for path in paths:
        guard = unset(path) if guard is None else guard | unset(path)
    assert guard is not None
    return Expr(guard.cel + " || " + then._operand("||"), lambda n: guard.test(n) or then.test(n), "||")


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    field: str | None  # dotted wire path below the node; None: the node itself
    details: str = ""  # the offending values, appended to the message by the models


@dataclass(frozen=True)
class Rule:
    """One validation rule: CEL for the apiserver (unless `admission` says otherwise) and the check.

    `bad` is an example the rule rejects (and nothing else does): the field's value, or for a
    model's rule the fields to set on a valid object of that model.
    """

    message: str
    cel: str | None
    find: Callable[[Any], Violation | None]
    bad: Any
    field_path: str | None = None  # where the apiserver reports it (CEL fieldPath), wire names
    admission: Admission = "cel"
    pattern: str | None = None  # with admission "pattern": the OpenAPI pattern
    why: str = ""  # with admission other than "cel": why not CEL
    raw: bool = False  # a field's rule judges the value as written, before pydantic converts it

    def x_validation(self) -> dict[str, str]:
        """The `x-kubernetes-validations` entry. Messages are static: a messageExpression that
        formats numbers has an unbounded estimated cost, which the apiserver refuses in lists."""
        assert self.cel is not None, self.message
        entry = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = "." + self.field_path
        return entry

    def error(self, violation: Violation) -> PydanticCustomError:
        message = f"{self.message} {violation.details}" if violation.details else self.message
        return rule_error(message, violation.field)

    def check(self, node: Any) -> Any:
        found = self.find(node)
        if found is not None:
            raise self.error(found)
        return node

    # As `Annotated` metadata on a field: the check wraps pydantic's, the CEL joins its schema.
    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        wrap = (
            core_schema.no_info_before_validator_function if self.raw else core_schema.no_info_after_validator_function
        )
        return wrap(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        if self.admission == "cel":
            json_schema.setdefault("x-kubernetes-validations", []).append(self.x_validation())
        return json_schema


def rule_error(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose text is used as is; `field` points below the model's own location."""
    # Braces would be read as format placeholders by pydantic-core.
    message = message.replace("{", "(").replace("}", ")")
    return PydanticCustomError(RULE_ERROR, message, {"field": field} if field else None)


def rule(
    expr: Expr,
    message: str,
    *,
    bad: Any,
    field_path: str | None = None,
    details: Callable[[Any], str] | None = None,
    raw: bool = False,
) -> Rule:
    """A rule that holds when `expr` does."""

    def find(node: Any) -> Violation | None:
        if expr.test(node):
            return None
        return Violation(field_path, details(node) if details else "")

    return Rule(message, expr.cel, find, bad, field_path=field_path, raw=raw)


def pattern(regex: str, message: str, *, bad: str) -> Rule:
    """A string field matches `regex` (CEL `matches`, an unanchored search: anchor it)."""
    return rule(matches(regex), message, bad=bad)


def compare(a: str, op: str, b: str, *, bad: Mapping[str, Any], why: str = "") -> Rule:
    """`a op b` whenever both are set; reported on `a`, with both values."""
    return rule(
        when_set([a, b], cmp(a, op, b)),
        f"{a} must be {op} {b}" + (f" {why}" if why else ""),
        bad=bad,
        field_path=a,
        details=lambda n: f"(got {value_at(n, a)} and {value_at(n, b)})",
    )


def exactly_one(a: str, b: str, *, bad: Mapping[str, Any]) -> Rule:
    return rule(
        Expr(
            f"has(self.{a}) != has(self.{b})",
            lambda n: (value_at(n, a) is None) != (value_at(n, b) is None),
            "cmp",
        ),
        f"set exactly one of {a} or {b}",
        bad=bad,
    )


def at_most_one(a: str, b: str, *, bad: Mapping[str, Any]) -> Rule:
    return rule(~(is_set(a) & is_set(b)), f"set at most one of {a} or {b}", bad=bad)


def unique(message: str, *, bad: Any, path: str = "", key: str = "") -> Rule:
    """No two items of the list at `path` are equal (or, with `key`, have equal `key`)."""
    items, of = _self(path), (lambda v: f"{v}.{key}") if key else (lambda v: v)

    def test(node: Any) -> bool:
        values = [value_at(v, key) for v in value_at(node, path)]
        return len(set(values)) == len(values)

    def details(node: Any) -> str:
        values = [str(value_at(v, key)) for v in value_at(node, path)]
        return f"(got {', '.join(sorted({v for v in values if values.count(v) > 1}))} more than once)"

    cel = f"{items}.all(x, {items}.exists_one(y, {of('y')} == {of('x')}))"
    return rule(Expr(cel, test), message, bad=bad, field_path=path or None, details=details)


def strictly_increasing(*, bad: list[int]) -> Rule:
    def test(steps: Any) -> bool:
        return all(a < b for a, b in itertools.pairwise(steps))

    return rule(
        Expr("self.isSorted() && self.all(s, self.exists_one(t, t == s))", test, "&&"),
        "must be strictly increasing (e.g. [0, 3, 6, 9])",
        bad=bad,
    )


def max_length(path: str, limit: int, message: str, *, bad: Any) -> Rule:
    def test(node: Any) -> bool:
        return len(value_at(node, path) or "") <= limit

    return rule(Expr(f"size(self.{path}) <= {limit}", test, "cmp"), message, bad=bad, field_path=path)


def judged_elsewhere(
    message: str,
    find: Callable[[Any], Violation | None],
    *,
    admission: Admission,
    why: str,
    bad: Any,
    pattern: str | None = None,
) -> Rule:
    """A rule the apiserver cannot run as CEL: an OpenAPI pattern, or the models alone."""
    return Rule(message, None, find, bad, admission=admission, pattern=pattern, why=why)


@dataclass(frozen=True)
class ListRules:
    """`Annotated` metadata for a list of pass-through objects: rules judged per item in Python,
    `items` the schema the apiserver gets for the items (patterns only, see judged_elsewhere)."""

    rules: tuple[Rule, ...]
    items: dict[str, Any] = field(default_factory=dict)

    def check(self, values: list[Any]) -> list[Any]:
        for each in self.rules:
            each.check(values)
        return values

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        if self.items:
            # Keep what the items' own annotations put there (their CEL rules).
            json_schema["items"] = {**json_schema.get("items", {}), **self.items}
        return json_schema


def model_schema_extra(schema: dict[str, Any], model: type[Any]) -> None:
    """`json_schema_extra` of the spec models: their `RULES` become the object's CEL rules."""
    entries = [r.x_validation() for r in getattr(model, "RULES", ()) if r.admission == "cel"]
    if entries:
        schema["x-kubernetes-validations"] = entries
