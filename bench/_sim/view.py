"""What an autoscaler may look at on one tick, and the interface every modelled autoscaler has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Autoscaler", "FleetView"]


@dataclass(frozen=True)
class FleetView:
    list_lengths: Mapping[str, int]  # LLEN of every Redis list of the tier's queue, by key name
    in_flight: int  # the queue's entries in kombu's `unacked` hash: reserved + running
    spec_replicas: int  # Deployment spec.replicas
    status_replicas: int  # pods not terminating (Deployment status.replicas)
    ready_replicas: int
    # (pod id, running, reserved) of every ready pod: what Celery remote control would answer.
    workers: tuple[tuple[int, int, int], ...] = ()
    # kombu's unacked_index as the poll would read it: delivery tag -> seconds since delivery.
    in_flight_ages: Mapping[str, float] | None = None


class Autoscaler(Protocol):
    name: str

    def due(self) -> float:
        """Simulated time of this autoscaler's next tick."""
        ...

    def tick(self, now: float, view: FleetView) -> int | None:
        """Act at ``now``; the replica count to write to the Deployment, or None to leave it."""
        ...
