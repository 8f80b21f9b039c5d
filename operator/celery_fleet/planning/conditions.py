"""Status conditions in the shape kstatus, Argo CD and Flux read (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: ConditionStatus
    reason: str
    message: str


def merge_conditions(
    current: Iterable[Mapping[str, Any]] | None,
    updates: Iterable[ConditionUpdate],
    *,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Apply updates; lastTransitionTime moves only when a condition's status changes."""
    by_type: dict[str, dict[str, Any]] = {c["type"]: dict(c) for c in current or [] if "type" in c}
    for up in updates:
        old = by_type.get(up.type)
        changed = old is None or old.get("status") != up.status
        by_type[up.type] = {
            "type": up.type,
            "status": up.status,
            "reason": up.reason,
            "message": up.message,
            "observedGeneration": generation,
            "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
        }
    order = {"Ready": 0, "Progressing": 1, "Degraded": 2, "BrokerReachable": 3}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


def conditions_equal(a: Iterable[Mapping[str, Any]] | None, b: Iterable[Mapping[str, Any]] | None) -> bool:
    def key(cs: Iterable[Mapping[str, Any]] | None) -> list[tuple[Any, ...]]:
        return sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
            for c in cs or []
        )

    return key(a) == key(b)
