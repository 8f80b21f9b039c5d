"""Kubernetes Events on our custom resources: one per decision, with its reason.

A repeat of the same Event (object, type, reason, message) within SERIES_WINDOW is counted on the
Event already written (`count`, `lastTimestamp`, as client-go's correlator does) instead of adding
an object per repeat: a broker that flaps, or a tier scaled back and forth by the same figures, keeps
one Event per distinct message.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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


SERIES_WINDOW = dt.timedelta(minutes=10)
SERIES_MAX = 10_000  # remembered series; the oldest are forgotten first

SeriesKey = tuple[str, str, str, str, str]


def series_key(ref: ObjectRef, reason: str, message: str, type_: EventType) -> SeriesKey:
    """What makes two Events the same: object, type, reason and the message as written."""
    return (ref.namespace, ref.uid, type_, reason, message[:1024])


@dataclass
class _Series:
    name: str
    count: int
    last: dt.datetime


@dataclass
class EventSeries:
    """The aggregation rule, pure (time is an argument): which Event a repeat is counted on.

    `repeat_of` says whether an Event is a repeat of one written within `window` (and counts it);
    `started` remembers an Event just written as the head of its series. The simulation replays the
    operator's decisions through this class to count the Events it writes.
    """

    window: dt.timedelta = SERIES_WINDOW
    limit: int = SERIES_MAX
    known: dict[SeriesKey, _Series] = field(default_factory=dict)

    def repeat_of(self, key: SeriesKey, now: dt.datetime) -> tuple[str, int] | None:
        """(the Event's name, its new count) when this is a repeat to count on it; None: write a new one."""
        series = self.known.get(key)
        if series is None or now - series.last >= self.window:
            return None
        series.count += 1
        series.last = now
        return series.name, series.count

    def started(self, key: SeriesKey, name: str, now: dt.datetime) -> None:
        if len(self.known) >= self.limit:
            self.known.pop(next(iter(self.known)))
        self.known[key] = _Series(name, 1, now)


# Per client, so each operator (and each test's fake apiserver) has series of its own.
_series: weakref.WeakKeyDictionary[Kube, EventSeries] = weakref.WeakKeyDictionary()
_series_lock = threading.Lock()


def post_event(kube: Kube, ref: ObjectRef, reason: str, message: str, type_: EventType = "Normal") -> None:
    """Best effort: an Event that cannot be written must not fail the reconcile that caused it."""
    now = dt.datetime.now(dt.UTC)
    body = event_body(ref, reason, message, type_, now)
    key = series_key(ref, reason, message, type_)
    with _series_lock:
        series = _series.setdefault(kube, EventSeries())
        repeat = series.repeat_of(key, now)
    try:
        if repeat is not None:
            patch = {"count": repeat[1], "lastTimestamp": body["lastTimestamp"]}
            try:
                kube.request("PATCH", resource_path("v1", "Event", ref.namespace, repeat[0]), body=patch,
                             content_type="application/merge-patch+json")  # fmt: skip
                return
            except ApiError as err:
                if err.status != 404:  # expired or deleted: start a new series below
                    raise
        kube.request("POST", resource_path("v1", "Event", ref.namespace), body=body)
        with _series_lock:
            series.started(key, body["metadata"]["name"], now)
    except ApiError as err:
        log.warning("could not post event %s on %s/%s: %s", reason, ref.namespace, ref.name, err)


class EventPoster:
    """Events posted off the caller's thread: a reconcile does not wait on its Events (best effort
    anyway), so a rollout's reconcile is its applies and one status write. At most `backlog` wait;
    past that an Event is dropped with a warning rather than holding memory for an apiserver that
    does not answer."""

    def __init__(self, kube: Kube, *, workers: int = 4, backlog: int = 10_000) -> None:
        self.kube = kube
        self.backlog = backlog
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="events")
        self._lock = threading.Lock()
        self._pending = 0

    def post(self, ref: ObjectRef, reason: str, message: str, type_: EventType = "Normal") -> None:
        with self._lock:
            if self._pending >= self.backlog:
                log.warning("event %s on %s/%s dropped: %d events wait", reason, ref.namespace, ref.name, self._pending)
                return
            self._pending += 1
        self._pool.submit(post_event, self.kube, ref, reason, message, type_).add_done_callback(self._done)

    def _done(self, _: Future[None]) -> None:
        with self._lock:
            self._pending -= 1

    def pending(self) -> int:
        with self._lock:
            return self._pending
