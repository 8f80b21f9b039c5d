"""Has a child drifted from what we applied? (pure)

We compare the desired manifest against the observed object as a *subset*: every
field we set must still hold our value; fields the apiserver defaulted or other
managers added are not ours to judge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The apiserver normalises quantities ("0.5" -> "500m"); comparing them would report
# drift forever, so resource requests/limits are left to the apply itself.
_UNCOMPARED_KEYS = frozenset({"resources"})


def drifted_fields(desired: Any, observed: Any, path: str = "") -> list[str]:
    """Paths under which `observed` no longer carries `desired`'s values."""
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            if key in _UNCOMPARED_KEYS:
                continue
            out += drifted_fields(value, observed.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, Sequence) and not isinstance(desired, str):
        if not isinstance(observed, Sequence) or isinstance(observed, str) or len(desired) != len(observed):
            return [path]
        out = []
        for i, (d, o) in enumerate(zip(desired, observed, strict=True)):
            out += drifted_fields(d, o, f"{path}[{i}]")
        return out
    if desired == observed:
        return []
    # YAML/JSON round trips may turn 1 into "1" for int-or-string fields.
    if isinstance(desired, int | str) and isinstance(observed, int | str) and str(desired) == str(observed):
        return []
    return [path]


def has_drifted(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    if observed is None:
        return True
    comparable = {k: v for k, v in desired.items() if k in ("metadata", "spec")}
    meta = dict(comparable.get("metadata") or {})
    # name/namespace identify the object; ownerReferences are compared, labels/annotations too.
    comparable["metadata"] = {k: v for k, v in meta.items() if k in ("labels", "annotations", "ownerReferences")}
    return bool(drifted_fields(comparable, observed))
