"""What the operator's watches have seen: pools, beats and their children, by key.

Filled only from watch events (Kopf), so reconciles and the autoscaler read cluster
state without polling the apiserver.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_fleet.brokers.redis.connection import TlsSettings
from celery_fleet.planning.beat_workload import BEAT_LABEL
from celery_fleet.planning.ownership import is_controlled_by
from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.scaler_conflict import OtherScaler, other_scaler
from celery_fleet.planning.workload import POOL_LABEL

__all__ = ["BEAT_LABEL", "POOL_LABEL"]  # re-exported for the handlers; declared in planning

ObjKey = tuple[str, str]  # (namespace, name)
ChildKey = tuple[str, str]  # (kind, name)


# What the reconcilers read of a child's status (planning.pool_status.observe_deployment); the rest
# of it (conditions with their messages and timestamps) is most of a status and never compared.
_DEPLOYMENT_STATUS = ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas", "observedGeneration")
_UNREAD_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)  # a second copy of the object
_SWEEP_EVERY = 4096  # subtrees registered between sweeps of the ones nothing shares


class SharedTrees:
    """Deep copies that share every subtree equal to one already held: a thousand Deployments from one
    template hold one readiness probe, one env entry, one set of defaults, one copy of each string.

    Cached objects are only read (writers build new dicts, as `note_replicas` does), so sharing is safe.
    Subtrees are found by a hash of their keys and leaf values and of their children's identities; a
    subtree no second object holds is dropped from the table now and then, so the table holds about
    what is shared. Not thread-safe: FleetCache calls it under its lock.
    """

    def __init__(self) -> None:
        self._by_hash: dict[int, dict[str, Any] | list[Any]] = {}
        self._added = 0

    def copy(self, value: Any) -> Any:
        kind = type(value)
        node: dict[str, Any] | list[Any]
        if kind is dict:
            mapping: dict[str, Any] = {}
            parts: list[Any] = ["{"]
            for k, v in value.items():
                k = sys.intern(k)
                v = self.copy(v)
                mapping[k] = v
                parts += (k, id(v) if type(v) in _TREES else (type(v), v))  # leaves by value and type
            node = mapping
        elif kind is list:
            node = [self.copy(v) for v in value]
            parts = ["[", *(id(v) if type(v) in _TREES else (type(v), v) for v in node)]
        elif kind is str:
            return sys.intern(value)
        elif isinstance(value, Mapping | list):  # not from JSON (a test's or Kopf's own types): as plain ones
            return self.copy(dict(value) if isinstance(value, Mapping) else list(value))
        else:
            return value
        h = hash(tuple(parts))
        found = self._by_hash.get(h)
        if found is not None and _same(found, node):
            return found
        self._by_hash[h] = node
        self._added += 1
        if self._added >= _SWEEP_EVERY:
            self._sweep()
        return node

    def _sweep(self) -> None:
        counts = _refcounts(self._by_hash)
        # Kept: subtrees two or more objects hold, and everything inside them (found bottom-up, a shared
        # subtree is only found again while its children are).
        todo: list[Any] = [n for h, n in self._by_hash.items() if counts[h] > _UNHELD + 1]
        keep: set[int] = set()
        while todo:
            node = todo.pop()
            if id(node) not in keep:
                keep.add(id(node))
                todo += [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, dict | list)]
        self._by_hash = {h: n for h, n in self._by_hash.items() if id(n) in keep}
        self._added = 0

    def __len__(self) -> int:
        return len(self._by_hash)


def _refcounts(table: Mapping[int, Any]) -> dict[int, int]:
    return {h: sys.getrefcount(n) for h, n in table.items()}


_UNHELD = _refcounts({0: []})[0]  # what _refcounts sees of an entry nothing else holds (the table's own)


_TREES = (dict, list)  # by identity (a shared subtree is one object); leaves by value and type: 1, 1.0, True hash alike


def _same(a: dict[str, Any] | list[Any], b: dict[str, Any] | list[Any]) -> bool:
    if type(a) is not type(b) or len(a) != len(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return all(ka is kb and _leaf_same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True))
    return all(_leaf_same(x, y) for x, y in zip(a, b, strict=True))


def _leaf_same(a: Any, b: Any) -> bool:
    if type(a) in _TREES or type(b) in _TREES:
        return a is b
    return type(a) is type(b) and a == b


def _slim(body: Mapping[str, Any], shared: SharedTrees) -> dict[str, Any]:
    """Keep what the reconcilers compare: drop managedFields (most of an object's size), a
    client-side apply's copy of the object, and the parts of children's status nobody reads."""
    kind = body.get("kind")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "metadata":
            meta = {k: v for k, v in (value or {}).items() if k != "managedFields"}
            annotations = meta.get("annotations")
            if annotations and any(a in annotations for a in _UNREAD_ANNOTATIONS):
                meta["annotations"] = {k: v for k, v in annotations.items() if k not in _UNREAD_ANNOTATIONS}
            out["metadata"] = shared.copy(meta)
        elif key == "status" and kind == "Deployment":
            out["status"] = {k: value[k] for k in _DEPLOYMENT_STATUS if k in (value or {})}
        elif key == "status" and kind == "PodDisruptionBudget":
            continue
        else:
            out[sys.intern(key)] = shared.copy(value)
    out.setdefault("metadata", {})
    return out


@dataclass
class PoolRuntime:
    """Per-pool state the autoscaler keeps between polls."""

    # Both derived from the tiers' decisions in one place (planning.tier_scaling): the count the reconciler
    # applies to spec.replicas (last written), and the status record (last decided, held or not).
    desired: dict[str, int] = field(default_factory=dict)
    scaling: dict[str, TierScaling] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    broker_url: str | None = None  # resolved (may come from a Secret): never logged
    broker_problem: tuple[str, str] | None = None  # (reason, message) of the last failed read
    layout_problem: str | None = None  # priority-like lists on the broker that the spec does not name
    broker_tls: TlsSettings | None = None  # resolved from spec.broker.tls (PEM text: never logged)
    insecure_tls_announced: bool = False
    layout_checked: bool = False  # the broker's keys were scanned at least once for this pool
    # Tier -> why its workers could not be asked (remote control off), from the last census of that tier.
    remote_control_off: dict[str, str] = field(default_factory=dict)
    remote_control_checked: bool = False  # some tier's workers were asked at least once
    # Queues no tier on the broker consumes (Celery's default queue) -> depth at the last poll; None: not read.
    unconsumed: dict[str, int] | None = None
    # Tiers whose Deployment an HPA or ScaledObject also scales: their replicas are not written.
    held_by_other_scaler: frozenset[str] = frozenset()
    # Tier -> why its scale-in is held (control path failed, pods unlisted): unknown, never idle.
    scale_in_held: dict[str, str] = field(default_factory=dict)


class FleetCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shared = SharedTrees()
        self.pools: dict[ObjKey, dict[str, Any]] = {}
        self.beats: dict[ObjKey, dict[str, Any]] = {}
        self.children: dict[ObjKey, dict[ChildKey, dict[str, Any]]] = defaultdict(dict)
        self.beat_children: dict[ObjKey, dict[ChildKey, dict[str, Any]]] = defaultdict(dict)
        self.runtime: dict[ObjKey, PoolRuntime] = defaultdict(PoolRuntime)
        # HPAs and ScaledObjects, only what the conflict check reads: namespace -> (kind, name) -> it.
        self.other_scalers: dict[str, dict[ChildKey, OtherScaler]] = defaultdict(dict)
        # Bumped on every write of a pool or one of its children: equal versions, same inputs.
        self._versions: dict[ObjKey, int] = {}
        self._version = itertools.count(1)

    # -- pools and beats
    def put_pool(self, body: Mapping[str, Any]) -> ObjKey:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            self.pools[key] = _slim(body, self._shared)
            self._versions[key] = next(self._version)
        return key

    def drop_pool(self, key: ObjKey) -> None:
        with self._lock:
            self.pools.pop(key, None)
            self.runtime.pop(key, None)
            self._versions.pop(key, None)
            self.children.pop(key, None)  # the GC deletes them; their DELETED events find nothing to drop

    def drop_pool_if_uid(self, key: ObjKey, uid: str | None) -> bool:
        """Drop the pool only if the cached one is still `uid` (one created again under its name is kept)."""
        with self._lock:
            body = self.pools.get(key)
            if body is None or body["metadata"].get("uid") != uid:
                return False
        self.drop_pool(key)
        return True

    def uids(self) -> tuple[dict[ObjKey, str | None], dict[ObjKey, str | None]]:
        """Pool and beat key -> uid, as cached now (the sweep's snapshot before it lists)."""
        with self._lock:
            return (
                {k: b["metadata"].get("uid") for k, b in self.pools.items()},
                {k: b["metadata"].get("uid") for k, b in self.beats.items()},
            )

    def version(self, key: ObjKey) -> int | None:
        """Changes whenever the pool or any of its children is written (None: not cached)."""
        return self._versions.get(key)

    def pool(self, key: ObjKey) -> dict[str, Any] | None:
        with self._lock:
            return self.pools.get(key)

    def put_beat(self, body: Mapping[str, Any]) -> ObjKey:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            self.beats[key] = _slim(body, self._shared)
        return key

    def drop_beat(self, key: ObjKey) -> None:
        with self._lock:
            self.beats.pop(key, None)

    def drop_beat_if_uid(self, key: ObjKey, uid: str | None) -> bool:
        with self._lock:
            body = self.beats.get(key)
            if body is None or body["metadata"].get("uid") != uid:
                return False
            self.beats.pop(key, None)
            return True

    # -- children
    def put_child(self, owner_label: str, body: Mapping[str, Any], deleted: bool = False) -> ObjKey | None:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(owner_label)
        if not owner:
            return None
        key = (meta["namespace"], owner)
        ckey = (body.get("kind", ""), meta["name"])
        table = self.children if owner_label == POOL_LABEL else self.beat_children
        with self._lock:
            if deleted:
                children = table.get(key)
                if children is not None:
                    children.pop(ckey, None)
                    if not children:
                        del table[key]
            else:
                table[key][ckey] = _slim(body, self._shared)
            if key in self._versions:
                self._versions[key] = next(self._version)
        return key

    def note_status(self, key: ObjKey, status: Mapping[str, Any]) -> None:
        """A status we wrote, before its watch event arrives (the pool is replaced, not changed: readers
        may hold the old body). Not a new version: none of the autoscaler's inputs changed."""
        with self._lock:
            body = self.pools.get(key)
            if body is not None:
                self.pools[key] = {**body, "status": status}

    def note_replicas(self, key: ObjKey, deployment: str, replicas: int) -> None:
        """A scale we wrote, before its watch event arrives: the next poll and reconcile see it, so
        neither writes it again (a loaded apiserver's events lag the write by a second or more)."""
        with self._lock:
            children = self.children.get(key)
            current = children.get(("Deployment", deployment)) if children else None
            if children is None or current is None:
                return
            children[("Deployment", deployment)] = {
                **current,
                "spec": {**(current.get("spec") or {}), "replicas": replicas},
            }
            if key in self._versions:
                self._versions[key] = next(self._version)

    def children_of(
        self, key: ObjKey, *, beat: bool = False, owner_uid: str | None = None
    ) -> dict[ChildKey, dict[str, Any]]:
        """Children by label; with `owner_uid`, only those that owner controls (labels can be copied)."""
        table = self.beat_children if beat else self.children
        with self._lock:
            found = dict(table.get(key, {}))
        if owner_uid is None:
            return found
        return {k: v for k, v in found.items() if is_controlled_by(v, owner_uid)}

    # -- other autoscalers (HPAs, KEDA ScaledObjects)
    def put_other_scaler(self, body: Mapping[str, Any], deleted: bool = False) -> list[ObjKey]:
        """Note an HPA or ScaledObject; returns the pools whose tiers it targets now or targeted before."""
        meta = body.get("metadata") or {}
        namespace, kind = str(meta.get("namespace", "")), str(body.get("kind", ""))
        skey = (kind, str(meta.get("name", "")))
        scaler = None if deleted else other_scaler(body)
        with self._lock:
            table = self.other_scalers[namespace]
            before = table.pop(skey, None)
            if scaler is not None:
                table[skey] = scaler
            elif not table:
                del self.other_scalers[namespace]
            targets = {s.target_name for s in (before, scaler) if s is not None}
            return [
                key for key in self.pools if key[0] == namespace and any(t.startswith(key[1] + "-") for t in targets)
            ]

    def other_scalers_in(self, namespace: str) -> list[OtherScaler]:
        with self._lock:
            return list(self.other_scalers.get(namespace, {}).values())

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            tiers = sum(len((p.get("spec") or {}).get("tiers") or [1, 2, 3]) for p in self.pools.values())
            return len(self.pools), tiers, len(self.beats)
