"""Status conditions in the shape kstatus, Argo CD and Flux read (pure).

kstatus (Flux, Helm 4 `--wait`) reads `observedGeneration`, then `Reconciling=True` as
InProgress, `Stalled=True` as Failed, then `Ready`; it ignores `Degraded`, which we keep for
people and for Argo CD's health script. Every state below sets all four, so no stale
abnormal-true condition outlives the state that raised it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from celery_fleet.api.models import Condition

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: ConditionStatus
    reason: str
    message: str


# Reasons only a change by the user can clear (the spec, a Secret, a conflicting object):
# retrying will not help, so they are Stalled and a pipeline fails with our message at once.
STALLED_REASONS = frozenset(
    {
        "InvalidSpec",
        "BrokerSecretMissing",
        "BrokerSecretEmpty",
        "BrokerSecretInvalid",
        "ChildRejected",
        "ChildConflict",
        # brokers.source.ErrorKind.REFUSED_BY_POLICY: the spec or the operator's policy must change.
        "BrokerRefusedByPolicy",
    }
)
# Condition types earlier versions wrote and nothing writes any more: dropped on the next write.
RETIRED_TYPES = frozenset({"Progressing"})
ORDER = {"Ready": 0, "Reconciling": 1, "Stalled": 2, "Degraded": 3, "BrokerReachable": 4, "QueuesConsumed": 5}


def settled(reason: str, message: str) -> list[ConditionUpdate]:
    """The desired state is reached."""
    return [
        ConditionUpdate("Ready", "True", reason, message),
        ConditionUpdate("Reconciling", "False", reason, "the desired state is reached"),
        ConditionUpdate("Stalled", "False", reason, "nothing blocks the reconcile"),
        ConditionUpdate("Degraded", "False", reason, "nothing blocks the reconcile"),
    ]


def progressing(reason: str, message: str) -> list[ConditionUpdate]:
    """On the way to the desired state; nothing is wrong."""
    return [
        ConditionUpdate("Ready", "False", reason, message),
        ConditionUpdate("Reconciling", "True", reason, message),
        ConditionUpdate("Stalled", "False", reason, "nothing blocks the reconcile"),
        ConditionUpdate("Degraded", "False", reason, "nothing blocks the reconcile"),
    ]


def blocked(reason: str, message: str) -> list[ConditionUpdate]:
    """Something is wrong: Stalled when only the user can fix it, else still Reconciling."""
    stalled = reason in STALLED_REASONS
    return [
        ConditionUpdate("Ready", "False", reason, message),
        ConditionUpdate(
            "Reconciling",
            "False" if stalled else "True",
            reason,
            "stalled until the problem is fixed; see Stalled" if stalled else message,
        ),
        ConditionUpdate(
            "Stalled", "True" if stalled else "False", reason, message if stalled else "retrying; see Degraded"
        ),
        ConditionUpdate("Degraded", "True", reason, message),
    ]


def scale_in_condition(held: Mapping[str, str], checked: bool) -> ConditionUpdate | None:
    """ScaleIn: False while some tier's scale-in is held because its workers could not be asked (the
    control path failed, the pods could not be listed): unknown is never idle. None: never asked."""
    if held:
        return ConditionUpdate("ScaleIn", "False", "WorkersUnknown", " ".join(held[t] for t in sorted(held)))
    if checked:
        return ConditionUpdate("ScaleIn", "True", "WorkersAsked", "every tier asked could be asked")
    return None


def merge_conditions(
    current: Iterable[Mapping[str, Any]] | None,
    updates: Iterable[ConditionUpdate],
    *,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Apply updates; lastTransitionTime moves only when a condition's status changes."""
    by_type: dict[str, dict[str, Any]] = {
        c["type"]: dict(c) for c in current or [] if "type" in c and c["type"] not in RETIRED_TYPES
    }
    for up in updates:
        old = by_type.get(up.type)
        changed = old is None or old.get("status") != up.status
        # Not validated: the apiserver judges the lengths, as for every status write.
        by_type[up.type] = Condition.model_construct(
            type=up.type,
            status=up.status,
            reason=up.reason,
            message=up.message,
            observed_generation=generation,
            last_transition_time=now if changed or old is None else old.get("lastTransitionTime", now),
        ).to_json()
    return sorted(by_type.values(), key=lambda c: (ORDER.get(c["type"], 99), c["type"]))


def conditions_equal(a: Iterable[Mapping[str, Any]] | None, b: Iterable[Mapping[str, Any]] | None) -> bool:
    def key(cs: Iterable[Mapping[str, Any]] | None) -> list[tuple[Any, ...]]:
        return sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
            for c in cs or []
        )

    return key(a) == key(b)
