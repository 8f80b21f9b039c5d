"""Writing a pool's or beat's children without ever taking over someone else's object.

A forced server-side apply would adopt any object of the child's name: add our ownerReference
(so the garbage collector deletes it with our owner) and take its fields. So a child is written
only when it is absent (a create-only apply) or controlled by our owner (an apply pinned to that
object's uid); a name taken by anything else is a ChildConflict and is left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.events import ObjectRef
from celery_fleet.planning.ownership import child_conflict, is_controlled_by
from celery_fleet.planning.pool_status import Problem


class ChildConflict(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _uid_changed(err: ApiError) -> bool:
    # The apiserver refuses an apply whose metadata.uid differs from the object's: "field is immutable".
    return err.status == 422 and "metadata.uid" in err.message


def apply_child(
    kube: Kube,
    child: Mapping[str, Any],
    *,
    owner: ObjectRef,
    current: Mapping[str, Any] | None = None,
    known_uid: str | None = None,
) -> dict[str, Any]:
    """Apply `child` of `owner` and return the result; raises ChildConflict if the name is not ours.

    `current` is the child as the watch cache last saw it (None: not seen); `known_uid` the uid of
    the object this process last applied, for kinds it does not watch.
    """
    kind, meta = child["kind"], child["metadata"]

    def conflict(found: Mapping[str, Any] | None) -> ChildConflict:
        return ChildConflict(child_conflict(kind, meta["name"], owner.kind, owner.name, found))

    uid = known_uid or None
    if current is not None:
        if not is_controlled_by(current, owner.uid):
            raise conflict(current)
        uid = (current.get("metadata") or {}).get("uid") or None
    try:
        return kube.apply(child, create_only=uid is None, uid=uid)
    except ApiError as err:
        if not (err.status == 409 and uid is None) and not _uid_changed(err):
            raise
    # Someone else's object, or ours under a uid our cache has not seen yet: look before writing.
    found = kube.get(child["apiVersion"], kind, meta["namespace"], meta["name"])
    if found is None:
        raise ApiError(status=409, reason="Conflict", message=f"{kind} {meta['name']} changed while being applied")
    if not is_controlled_by(found, owner.uid):
        raise conflict(found)
    return kube.apply(child, uid=found["metadata"]["uid"])
