"""Issue 13 item 5: the decisions behind never taking over a child, one path each (the apiserver side is in
tests/integration/test_tenancy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.handlers.children import ChildConflict, apply_child
from celery_fleet.kube.client import ApiError
from celery_fleet.kube.events import ObjectRef
from celery_fleet.planning.ownership import child_conflict, is_controlled_by

OWNER = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", "shop", "orders", "pool-uid")
CHILD = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": {"name": "orders-high", "namespace": "shop"}, "spec": {}}  # fmt: skip


def _obj(uid: str, controller_uid: str | None, kind: str = "CeleryWorkerPool", name: str = "orders") -> dict[str, Any]:
    refs = [{"kind": kind, "name": name, "uid": controller_uid, "controller": True}] if controller_uid else []
    return {"metadata": {"name": "orders-high", "namespace": "shop", "uid": uid, "ownerReferences": refs}}


class FakeKube:
    """Answers applies from a script; records what was sent."""

    def __init__(self, applies: list[Any], found: dict[str, Any] | None = None) -> None:
        self.applies = applies
        self.found = found
        self.sent: list[dict[str, Any]] = []

    def apply(self, obj: Any, *, create_only: bool = False, uid: str | None = None, force: bool = True) -> Any:
        self.sent.append({"create_only": create_only, "uid": uid})
        answer = self.applies.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    def get(self, *_: Any) -> dict[str, Any] | None:
        return self.found


CONFLICT = ApiError(409, "Conflict", "the object has been modified")
UID_CHANGED = ApiError(422, "Invalid", 'metadata.uid: Invalid value: "x": field is immutable')


def test_absent_is_created_only_if_still_absent() -> None:
    kube = FakeKube([{"ok": 1}])
    assert apply_child(kube, CHILD, owner=OWNER) == {"ok": 1}  # type: ignore[arg-type]
    assert kube.sent == [{"create_only": True, "uid": None}]


def test_ours_is_applied_pinned_to_its_uid() -> None:
    kube = FakeKube([{"ok": 1}])
    apply_child(kube, CHILD, owner=OWNER, current=_obj("c1", "pool-uid"))  # type: ignore[arg-type]
    assert kube.sent == [{"create_only": False, "uid": "c1"}]


@pytest.mark.parametrize("current", [_obj("c1", None), _obj("c1", "other-uid", "CeleryWorkerPool", "billing")])
def test_someone_elses_is_never_written(current: dict[str, Any]) -> None:
    kube = FakeKube([])
    with pytest.raises(ChildConflict) as caught:
        apply_child(kube, CHILD, owner=OWNER, current=current)  # type: ignore[arg-type]
    assert kube.sent == []
    assert caught.value.problem.reason == "ChildConflict"
    assert "PodDisruptionBudget orders-high already exists" in caught.value.problem.message


def test_created_meanwhile_by_someone_else_is_a_conflict_after_one_look() -> None:
    kube = FakeKube([CONFLICT], found=_obj("u1", None))
    with pytest.raises(ChildConflict):
        apply_child(kube, CHILD, owner=OWNER)  # type: ignore[arg-type]
    assert kube.sent == [{"create_only": True, "uid": None}]


def test_ours_but_not_yet_in_the_cache_is_applied_after_one_look() -> None:
    kube = FakeKube([CONFLICT, {"ok": 1}], found=_obj("c2", "pool-uid"))
    assert apply_child(kube, CHILD, owner=OWNER) == {"ok": 1}  # type: ignore[arg-type]
    assert kube.sent == [{"create_only": True, "uid": None}, {"create_only": False, "uid": "c2"}]


def test_replaced_under_the_same_name_is_judged_again() -> None:
    kube = FakeKube([UID_CHANGED], found=_obj("u9", None))
    with pytest.raises(ChildConflict):
        apply_child(kube, CHILD, owner=OWNER, known_uid="c1")  # type: ignore[arg-type]


def test_gone_between_the_refusal_and_the_look_is_retried_later() -> None:
    kube = FakeKube([CONFLICT], found=None)
    with pytest.raises(ApiError) as caught:
        apply_child(kube, CHILD, owner=OWNER)  # type: ignore[arg-type]
    assert caught.value.status == 409


def test_other_errors_pass_through_untouched() -> None:
    kube = FakeKube([ApiError(422, "Invalid", "spec.minAvailable: bad")])
    with pytest.raises(ApiError, match="minAvailable"):
        apply_child(kube, CHILD, owner=OWNER)  # type: ignore[arg-type]


def test_labels_do_not_make_an_object_ours_and_an_earlier_owner_is_named() -> None:
    copied = {"metadata": {"labels": {"celeryfleet.io/pool": "orders"}}}
    assert not is_controlled_by(copied, "pool-uid")
    assert not is_controlled_by(_obj("c", "pool-uid"), "")
    earlier = child_conflict("Deployment", "orders-high", "CeleryWorkerPool", "orders", _obj("c", "old-uid"))
    assert "earlier CeleryWorkerPool orders (uid old-uid)" in earlier.message
