"""Issue 16.8: a repeated Event is counted on the Event already written (count, lastTimestamp)."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from celery_fleet.kube.client import Kube
from celery_fleet.kube.events import ObjectRef, post_event

pytestmark = pytest.mark.integration


def test_repeats_count_on_one_event_and_distinct_messages_get_their_own(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    kube = Kube(k8s_api)
    ref = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", namespace, "shop", str(uuid.uuid4()))
    for _ in range(5):
        post_event(kube, ref, "BrokerConnectionError", "cannot read queue depth: refused", "Warning")
    post_event(kube, ref, "ScaledUp", "Scaled tier high 2 -> 6")
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    by_reason = {e.reason: e for e in events if e.involved_object.uid == ref.uid}
    assert len([e for e in events if e.involved_object.uid == ref.uid]) == 2
    assert by_reason["BrokerConnectionError"].count == 5
    assert by_reason["BrokerConnectionError"].last_timestamp >= by_reason["BrokerConnectionError"].first_timestamp
    assert by_reason["ScaledUp"].count == 1

    # The series' Event is gone (expired, deleted): the next repeat starts a new one.
    core = client.CoreV1Api(k8s_api)
    core.delete_namespaced_event(by_reason["BrokerConnectionError"].metadata.name, namespace)
    post_event(kube, ref, "BrokerConnectionError", "cannot read queue depth: refused", "Warning")
    again = [e for e in core.list_namespaced_event(namespace).items if e.reason == "BrokerConnectionError"]
    assert len(again) == 1 and again[0].count == 1
