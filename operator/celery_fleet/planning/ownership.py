"""Which objects are ours to write (pure).

An object is ours when its controller ownerReference names our owner's uid: exactly what our
builders write (`workload.owner_reference`) and what the garbage collector follows. Labels do
not count (anyone can copy them), nor does our field manager in managedFields (a forced apply
by anyone named `celery-fleet` would have set it). Anything else of the same name belongs to
someone else: we never write, adopt or delete it, and say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_fleet.planning.pool_status import Problem

CHILD_CONFLICT = "ChildConflict"


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            return ref
    return None


def is_controlled_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    ref = controller_of(obj)
    return bool(owner_uid) and ref is not None and ref.get("uid") == owner_uid


def child_conflict(kind: str, name: str, owner_kind: str, owner_name: str, found: Mapping[str, Any] | None) -> Problem:
    """Degraded's reason and message for a child name taken by an object that is not ours."""
    ref = controller_of(found) if found is not None else None
    if ref is not None and ref.get("kind") == owner_kind and ref.get("name") == owner_name:
        # A pool deleted and created again: the old one's children wait for the garbage collector.
        return Problem(
            CHILD_CONFLICT,
            f"{kind} {name} still belongs to an earlier {owner_kind} {owner_name} (uid {ref.get('uid')}); "
            "waiting for the garbage collector to remove it. If it stays, delete that "
            f"{kind}.",
        )
    whose = f"it is controlled by {ref.get('kind')} {ref.get('name')}" if ref else "it has no controller"
    return Problem(
        CHILD_CONFLICT,
        f"{kind} {name} already exists and this {owner_kind} does not own it ({whose}); celery-fleet does not "
        f"take over objects it did not create. Rename or delete that {kind}, or give this {owner_kind} "
        "another name.",
    )
