"""Kopf handlers: watch events in, keys onto the work queues. No business logic here.

Every handler is an `on.event` watcher: Kopf stores no handler progress on our
objects and adds no finalizers, so deleting a namespace never waits on us and
the garbage collector removes children through their ownerReferences.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from celery_fleet import GROUP, VERSION
from celery_fleet.handlers.cache import BEAT_LABEL, POOL_LABEL, ObjKey
from celery_fleet.handlers.fleet import Fleet
from celery_fleet.kube.login import Transport, load_credentials
from celery_fleet.planning.workload import MANAGED_BY, MANAGED_BY_LABEL

log = logging.getLogger(__name__)
MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}


class NoDiffBase(kopf.DiffBaseStorage):
    """No essence kept: we register no change handlers, so Kopf's diff is never read, yet its default
    storage deep-copies every watched object on every event (a quarter of the operator's CPU during
    a 1000-pool rollout, py-spy). Kopf's documented extension point for where the diff base lives."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _fleet(memo: Any) -> Fleet:
    fleet: Fleet = memo["fleet"]
    return fleet


@kopf.on.login(id="login")
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Kopf's watches use the credentials the operator's own requests use (read again on a 401)."""
    api = _fleet(memo).kube.api
    creds = api.credentials if isinstance(api, Transport) else load_credentials(os.environ.get("KUBECONFIG"))
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_file,
        insecure=creds.insecure or None,
        token=creds.token(refresh=creds.refreshable),
        certificate_path=creds.cert_file,
        private_key_path=creds.key_file,
        default_namespace=creds.namespace,
    )


@kopf.on.startup(id="start-fleet")
async def start_fleet(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = NoDiffBase()
    fleet = _fleet(memo)
    memo["tasks"] = [asyncio.create_task(fleet.run(), name="celery-fleet-runtime")]


@kopf.on.cleanup(id="stop-fleet")
async def stop_fleet(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.get("tasks", []):
        task.cancel()


@kopf.on.event(GROUP, VERSION, "celeryworkerpools", id="pool-events")
async def pool_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    fleet = _fleet(memo)
    _owner_event(event, fleet.cache.put_pool, fleet.cache.drop_pool, fleet.pool_queue.add)


@kopf.on.event(GROUP, VERSION, "celerybeats", id="beat-events")
async def beat_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    fleet = _fleet(memo)
    _owner_event(event, fleet.cache.put_beat, fleet.cache.drop_beat, fleet.beat_queue.add)


def _owner_event(
    event: kopf.RawEvent,
    put: Callable[[Mapping[str, Any]], ObjKey],
    drop: Callable[[ObjKey], None],
    enqueue: Callable[[ObjKey], None],
) -> None:
    raw = event["object"]
    key = (raw["metadata"]["namespace"], raw["metadata"]["name"])
    if event["type"] == "DELETED":
        drop(key)
    else:
        put(raw)
    enqueue(key)  # a deleted key too: its reconciler forgets what it kept (metrics, runtime state)


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={BEAT_LABEL: kopf.PRESENT}, id="beat-lease-events")
async def lease_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _child_event(_fleet(memo), event, "Lease")


@kopf.index("apps", "v1", "deployments", labels=MANAGED, id="deployments-listed")
def deployments_listed(**_: Any) -> None:
    """Indexes nothing: a Kopf index holds every handler until the Deployments have been listed.

    Without it a restarted operator may reconcile a pool before its tiers' Deployments reach
    the cache, take them for missing and apply them at replicas.min, cutting every tier the
    autoscaler had scaled up.
    """
    return None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED, id="pool-deployment-events")
async def deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _child_event(_fleet(memo), event, "Deployment")


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED, id="pool-pdb-events")
async def pdb_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _child_event(_fleet(memo), event, "PodDisruptionBudget")


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", id="other-scaler-hpa-events")
async def hpa_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _other_scaler_event(_fleet(memo), event, "HorizontalPodAutoscaler")


# Served only once KEDA's CRD exists (Kopf watches for it to appear).
@kopf.on.event("keda.sh", "v1alpha1", "scaledobjects", id="other-scaler-keda-events")
async def scaled_object_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _other_scaler_event(_fleet(memo), event, "ScaledObject")


def _other_scaler_event(fleet: Fleet, event: kopf.RawEvent, kind: str) -> None:
    # Every HPA in the cluster comes through here (no label to select on): the cache keeps only its target.
    body = {**event["object"], "kind": kind}
    for key in fleet.cache.put_other_scaler(body, deleted=event["type"] == "DELETED"):
        fleet.pool_queue.add(key)


def _child_event(fleet: Fleet, event: kopf.RawEvent, kind: str) -> None:
    raw: dict[str, Any] = dict(event["object"])
    raw["kind"] = kind
    labels = raw.get("metadata", {}).get("labels") or {}
    deleted = event["type"] == "DELETED"
    if POOL_LABEL in labels:
        key = fleet.cache.put_child(POOL_LABEL, raw, deleted=deleted)
        if key is not None and key in fleet.cache.pools:
            fleet.pool_queue.add(key)
    elif BEAT_LABEL in labels:
        key = fleet.cache.put_child(BEAT_LABEL, raw, deleted=deleted)
        if key is not None and key in fleet.cache.beats:
            fleet.beat_queue.add(key)
