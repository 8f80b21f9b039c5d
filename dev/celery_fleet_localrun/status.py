"""What the local runtime writes into a pod's status, so readiness in the cluster is real. (pure)

kwok's default stage marks every pod Running and Ready the moment it is scheduled, although nothing
runs. For the pods the local runtime runs (labelled `cluster.RUN_LABEL`) the local cluster has a
stage of its own (hack/kwok/pod-run-by-local-runtime.yaml): kwok makes them Running with a pod IP
and writes no Ready, ContainersReady or container status at all. The local runtime then plays the
kubelet's reporting: it writes `Ready` and `ContainersReady` and the container statuses from its own
processes, so a pod is Ready only once its worker process is up and (for workers) connected to the
broker, and restarts show in `restartCount`. The Deployment's readyReplicas, and the pool's status
built from it, count real workers from the pod's first moment: no Ready -> not ready -> Ready flap.
kwok never writes a Running pod again (its stages only match Pending pods), so our conditions stick.

The conditions carry reasons of their own (`LocalProcessReady`, `LocalProcessStarting`, ...)
and a message naming the local pid, so nobody mistakes them for a kubelet's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from celery_fleet_localrun.supervisor import ContainerView, Exit, PodView

Manifest = Mapping[str, Any]

READY = "LocalProcessReady"
STARTING = "LocalProcessStarting"
NOT_RUNNING = "LocalProcessNotRunning"
STOPPED = "LocalRuntimeStopped"


def timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(c: ContainerView) -> str:
    if c.state == "running":
        if c.ready:
            how = "connected to the broker" if c.probed else "running"
        else:
            how = "not connected to the broker yet" if c.probed else "starting"
        return f"{c.name}: pid {c.pid}, {how}"
    if c.state == "terminated":
        return f"{c.name}: exited"
    detail = f" ({c.waiting_message})" if c.waiting_message else ""
    return f"{c.name}: {c.waiting_reason}{detail}"


def ready_condition(view: PodView) -> tuple[str, str, str]:
    """(status, reason, message) of the pod's Ready condition."""
    message = "local process " + "; ".join(_describe(c) for c in view.containers)
    if view.ready:
        return "True", READY, message
    if all(c.state == "running" for c in view.containers):
        return "False", STARTING, message
    return "False", NOT_RUNNING, message


def _terminated(exit_: Exit) -> dict[str, Any]:
    state: dict[str, Any] = {
        # A process killed by signal N reads -N locally; the kubelet reports 128 + N.
        "exitCode": exit_.code if exit_.code >= 0 else 128 - exit_.code,
        "reason": exit_.reason,
        "startedAt": timestamp(exit_.started_at),
        "finishedAt": timestamp(exit_.finished_at),
    }
    if exit_.code < 0:
        state["signal"] = -exit_.code
    return state


def container_status(c: ContainerView, now: dt.datetime) -> dict[str, Any]:
    state: dict[str, Any]
    if c.state == "running":
        state = {"running": {"startedAt": timestamp(c.started_at or now)}}
    elif c.state == "terminated" and c.last_exit is not None:
        state = {"terminated": _terminated(c.last_exit)}
    else:
        waiting: dict[str, Any] = {"reason": c.waiting_reason or "ContainerCreating"}
        if c.waiting_message:
            waiting["message"] = c.waiting_message
        state = {"waiting": waiting}
    last_state: dict[str, Any] = {}
    if c.last_exit is not None and c.state != "terminated":
        last_state = {"terminated": _terminated(c.last_exit)}
    return {
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "ready": c.ready,
        "started": c.state == "running",
        "restartCount": c.restarts,
        "state": state,
        "lastState": last_state,
    }


def _cond(type_: str, status: str, reason: str, message: str, since: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def _condition(pod: Manifest, type_: str) -> Manifest:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def _shape(statuses: Any) -> list[tuple[Any, ...]]:
    """The parts of container statuses we own, for comparing ours with the pod's."""
    shape = []
    for s in statuses or []:
        state = s.get("state") or {}
        kind = next(iter(state), None)
        detail = (state.get(kind) or {}).get("reason") if kind else None
        shape.append((s.get("name"), bool(s.get("ready")), int(s.get("restartCount") or 0), kind, detail))
    return shape


def status_patch(pod: Manifest, view: PodView, now: dt.datetime) -> dict[str, Any] | None:
    """A strategic-merge patch for the pod's status subresource, or None when it already says this."""
    status, reason, message = ready_condition(view)
    ready = _condition(pod, "Ready")
    statuses = [container_status(c, now) for c in view.containers]
    init_statuses = [container_status(c, now) for c in view.init]
    observed = pod.get("status") or {}
    if (
        (ready.get("status"), ready.get("reason"), ready.get("message")) == (status, reason, message)
        and _condition(pod, "ContainersReady").get("status") == status
        and _shape(observed.get("containerStatuses")) == _shape(statuses)
        and _shape(observed.get("initContainerStatuses")) == _shape(init_statuses)
    ):
        return None
    since = ready.get("lastTransitionTime") if ready.get("status") == status else None
    conditions = [
        {
            "type": t,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since or timestamp(now),
        }
        for t in ("Ready", "ContainersReady")
    ]
    patch: dict[str, Any] = {"status": {"conditions": conditions, "containerStatuses": statuses}}
    if init_statuses:
        patch["status"]["initContainerStatuses"] = init_statuses
    return patch


def stopped_patch(now: dt.datetime) -> dict[str, Any]:
    """On the runtime's exit: the pods it ran are no longer backed by a process."""
    message = "the local runtime stopped; no process runs for this pod"
    return {
        "status": {
            "conditions": [
                {
                    "type": t,
                    "status": "False",
                    "reason": STOPPED,
                    "message": message,
                    "lastTransitionTime": timestamp(now),
                }
                for t in ("Ready", "ContainersReady")
            ]
        }
    }
