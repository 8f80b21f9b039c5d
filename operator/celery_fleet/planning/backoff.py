"""The one exponential backoff: broker reconnects, reconcile retries, local restarts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Wait before the n-th consecutive retry: initial * factor**(n-1), at most ``maximum``."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 5.0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * self.factor ** max(0, failures - 1)))
