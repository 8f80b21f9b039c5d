"""Kubernetes Events on our custom resources: one per decision, with its reason."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from celery_fleet.kube.client import ApiError, Kube, resource_path

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ObjectRef:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["namespace"], meta["name"], meta.get("uid", ""))


def event_body(ref: ObjectRef, reason: str, message: str, type_: EventType, now: dt.datetime) -> dict[str, Any]:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:12]}", "namespace": ref.namespace},
        "involvedObject": {
            "apiVersion": ref.api_version,
            "kind": ref.kind,
            "namespace": ref.namespace,
            "name": ref.name,
            "uid": ref.uid,
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": "celery-fleet"},
        "reportingComponent": "celery-fleet",
    }


def post_event(kube: Kube, ref: ObjectRef, reason: str, message: str, type_: EventType = "Normal") -> None:
    """Best effort: an Event that cannot be written must not fail the reconcile that caused it."""
    body = event_body(ref, reason, message, type_, dt.datetime.now(dt.UTC))
    try:
        kube.request("POST", resource_path("v1", "Event", ref.namespace), body=body)
    except ApiError as err:
        log.warning("could not post event %s on %s/%s: %s", reason, ref.namespace, ref.name, err)
