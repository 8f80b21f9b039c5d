"""Pools and beats gone without a DELETED event (their namespace's watch stopped first) are swept."""

from __future__ import annotations

from typing import Any

from kubernetes.client.rest import ApiException

from celery_fleet.handlers.fleet import Fleet
from celery_fleet.kube.client import Kube
from celery_fleet.planning.sweep import gone


def test_gone_is_what_was_cached_before_the_list_and_is_not_in_it() -> None:
    snapshot = {("a", "p1"): "u1", ("a", "p2"): "u2", ("a", "p3"): None, ("b", "p1"): "u9"}
    assert gone(snapshot, "a", ["u1"]) == [("a", "p2")], "no uid: never judged; other namespaces untouched"
    assert gone(snapshot, "a", ["u1", "u2"]) == []


class _ListingApi:
    """Answers LISTs of CeleryWorkerPools/CeleryBeats from `live` (namespace -> kind plural -> uids)."""

    def __init__(self, live: dict[str, dict[str, list[str]]], failing: frozenset[str] = frozenset()) -> None:
        self.live, self.failing = live, failing
        self.calls: list[tuple[str, str]] = []

    def call_api(self, path: str, method: str, **_: Any) -> tuple[Any, int, dict[str, str]]:
        self.calls.append((method, path))
        parts = path.split("/")  # /apis/<group>/<version>/namespaces/<ns>/<plural>
        namespace, plural = parts[5], parts[6]
        if namespace in self.failing:
            raise ApiException(status=500, reason="Internal Server Error")
        uids = self.live.get(namespace, {}).get(plural, [])
        return (
            {"items": [{"metadata": {"namespace": namespace, "name": f"x{i}", "uid": u}} for i, u in enumerate(uids)]},
            200,
            {},
        )


def _body(kind: str, namespace: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "celeryfleet.io/v1alpha1", "kind": kind,
            "metadata": {"namespace": namespace, "name": name, "uid": uid}, "spec": {}}  # fmt: skip


def test_the_sweep_drops_only_what_a_list_shows_gone_and_keeps_it_when_the_list_fails() -> None:
    api = _ListingApi({"live": {"celeryworkerpools": ["u1"], "celerybeats": ["b1"]}}, failing=frozenset({"unknown"}))
    fleet = Fleet(Kube(api))  # type: ignore[arg-type]  # duck-typed ApiClient
    for kind, ns, name, uid in [
        ("CeleryWorkerPool", "live", "kept", "u1"),
        ("CeleryWorkerPool", "live", "recreated-elsewhere", "u-old"),
        ("CeleryWorkerPool", "deleted", "zombie", "u2"),
        ("CeleryWorkerPool", "unknown", "unsure", "u3"),
        ("CeleryBeat", "live", "beat", "b1"),
        ("CeleryBeat", "deleted", "beat", "b2"),
    ]:
        (fleet.cache.put_pool if kind == "CeleryWorkerPool" else fleet.cache.put_beat)(_body(kind, ns, name, uid))
    dropped = fleet.sweep()
    assert sorted(dropped) == [("deleted", "beat"), ("deleted", "zombie"), ("live", "recreated-elsewhere")]
    assert sorted(fleet.cache.pools) == [("live", "kept"), ("unknown", "unsure")], "a failed LIST keeps them"
    assert sorted(fleet.cache.beats) == [("live", "beat")]
    assert len(api.calls) == 5, "one LIST per namespace and kind with cached objects"
    assert all(m == "GET" for m, _ in api.calls)
