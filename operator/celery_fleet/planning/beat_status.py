"""What a CeleryBeat's status should say, from its Lease and Deployment (pure)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_fleet.api.models import CeleryBeatStatus
from celery_fleet.planning.conditions import ConditionUpdate, blocked, progressing, settled
from celery_fleet.planning.pool_status import Problem


@dataclass(frozen=True)
class LeaseView:
    holder: str | None
    transitions: int
    renew_time: dt.datetime | None
    duration_seconds: int


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def view_lease(lease: Mapping[str, Any] | None, default_duration: int) -> LeaseView:
    spec = (lease or {}).get("spec") or {}
    return LeaseView(
        holder=spec.get("holderIdentity") or None,
        transitions=int(spec.get("leaseTransitions") or 0),
        renew_time=parse_time(spec.get("renewTime") or spec.get("acquireTime")),
        duration_seconds=int(spec.get("leaseDurationSeconds") or default_duration),
    )


def current_leader(lease: LeaseView, now: dt.datetime) -> str | None:
    """The holder while its last renewal is within the lease duration; else nobody."""
    if lease.holder is None or lease.renew_time is None:
        return None
    if lease.renew_time + dt.timedelta(seconds=lease.duration_seconds) < now:
        return None
    return lease.holder


@dataclass(frozen=True)
class BeatStatusInput:
    generation: int
    lease: LeaseView
    now: dt.datetime
    # When the operator first saw the lease without a live holder (None while one holds it).
    leaderless_since: dt.datetime | None
    configured_duration: int
    deployment_exists: bool
    problem: Problem | None = None


def beat_status(inp: BeatStatusInput) -> tuple[dict[str, Any], list[ConditionUpdate]]:
    leader = current_leader(inp.lease, inp.now)
    renewed = inp.lease.renew_time
    body = CeleryBeatStatus(
        observed_generation=inp.generation,
        leader=leader or "",  # "", not None: a merge patch must clear the last leader
        lease_transitions=inp.lease.transitions,
        renew_time=renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if renewed is not None else None,
    ).to_json()
    if inp.problem is not None:
        return body, blocked(inp.problem.reason, inp.problem.message)
    if leader is not None:
        return body, settled("LeaderElected", f"{leader} holds the lease and runs celery beat")
    since = inp.leaderless_since or inp.now
    waited = (inp.now - since).total_seconds()
    if waited > inp.configured_duration:
        # Degraded, not Stalled: a standby or a restarted pod may still take the lease.
        message = (
            f"no pod has held the lease for {int(waited)}s (> leaseDuration {inp.configured_duration}s): "
            "check the beat pods' logs and that they can reach the apiserver"
        )
        return body, blocked("NoLeader", message)
    message = "waiting for a beat pod to acquire the lease"
    if not inp.deployment_exists:
        message = "creating the beat Deployment"
    return body, progressing("Electing", message)
