"""What the operator's watches have seen: pools, beats and their children, by key.

Filled only from watch events (Kopf), so reconciles and the autoscaler read cluster
state without polling the apiserver.
"""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_fleet.brokers.redis.connection import TlsSettings
from celery_fleet.planning.beat_workload import BEAT_LABEL
from celery_fleet.planning.ownership import is_controlled_by
from celery_fleet.planning.pool_status import TierScaling
from celery_fleet.planning.workload import POOL_LABEL

__all__ = ["BEAT_LABEL", "POOL_LABEL"]  # re-exported for the handlers; declared in planning

ObjKey = tuple[str, str]  # (namespace, name)
ChildKey = tuple[str, str]  # (kind, name)


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """Drop what we never read (managedFields is most of an object's size)."""
    out = {k: copy.deepcopy(v) for k, v in body.items() if k != "metadata"}
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = copy.deepcopy(meta)
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


class FleetCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pools: dict[ObjKey, dict[str, Any]] = {}
        self.beats: dict[ObjKey, dict[str, Any]] = {}
        self.children: dict[ObjKey, dict[ChildKey, dict[str, Any]]] = defaultdict(dict)
        self.beat_children: dict[ObjKey, dict[ChildKey, dict[str, Any]]] = defaultdict(dict)
        self.runtime: dict[ObjKey, PoolRuntime] = defaultdict(PoolRuntime)

    # -- pools and beats
    def put_pool(self, body: Mapping[str, Any]) -> ObjKey:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            self.pools[key] = _slim(body)
        return key

    def drop_pool(self, key: ObjKey) -> None:
        with self._lock:
            self.pools.pop(key, None)
            self.runtime.pop(key, None)

    def pool(self, key: ObjKey) -> dict[str, Any] | None:
        with self._lock:
            return self.pools.get(key)

    def put_beat(self, body: Mapping[str, Any]) -> ObjKey:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            self.beats[key] = _slim(body)
        return key

    def drop_beat(self, key: ObjKey) -> None:
        with self._lock:
            self.beats.pop(key, None)

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
                table[key].pop(ckey, None)
            else:
                table[key][ckey] = _slim(body)
        return key

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

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            tiers = sum(len((p.get("spec") or {}).get("tiers") or [1, 2, 3]) for p in self.pools.values())
            return len(self.pools), tiers, len(self.beats)
