"""kube/events.EventPoster: a reconcile's Events are posted by other threads, in order, and a full
backlog drops an Event instead of growing without bound."""

from __future__ import annotations

import threading
from typing import Any

from celery_fleet.kube.client import Kube
from celery_fleet.kube.events import EventPoster, ObjectRef
from tests.support.fake_api import RecordingApi
from tests.support.wait import wait_for


class _HeldApi(RecordingApi):
    """An apiserver that holds every Event POST until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        if path.endswith("/events"):
            assert self.release.wait(30)
        return super().call_api(path, method, **kwargs)


def test_events_are_posted_off_the_callers_thread_and_a_full_backlog_drops() -> None:
    api = _HeldApi()
    poster = EventPoster(Kube(api), workers=1, backlog=2)  # type: ignore[arg-type]  # duck-typed ApiClient
    ref = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", "shop", "orders", "uid-1")
    for i in range(3):
        poster.post(ref, "Created", f"Created Deployment orders-{i}")  # returns at once: the POSTs are held
    assert poster.pending() == 2  # the third found the backlog full and was dropped
    api.release.set()
    wait_for(lambda: poster.pending() == 0, timeout=10, message="the held events")
    posted = [b["message"] for (m, path, b) in api.writes if m == "POST" and path.endswith("/events")]
    assert posted == ["Created Deployment orders-0", "Created Deployment orders-1"]
