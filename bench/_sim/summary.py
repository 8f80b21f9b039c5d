"""Per (trace, autoscaler): wait percentiles over every task of every seed, mean cost, peak replicas."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import SimResult, percentile

__all__ = ["Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    trace: str
    scaler: str
    runs: int
    tasks: int
    p50: float
    p95: float
    p99: float
    max_wait: float
    p95_priority0: float  # tasks in the bare list (what LLEN sees)
    p95_prioritised: float  # tasks in the priority sub-lists
    worker_seconds: float  # mean per run
    peak_replicas: int  # highest over the runs
    busy_removals: float  # mean per run
    drain_seconds: float  # mean per run
    unfinished: int  # tasks never run before the overrun limit, all runs


def summarize(results: Sequence[SimResult]) -> Summary:
    if not results:
        raise ValueError("no results to summarize")
    waits: list[float] = []
    bare: list[float] = []
    prio: list[float] = []
    for r in results:
        for w, p in zip(r.waits, r.priorities, strict=True):
            waits.append(w)
            (prio if p > 0 else bare).append(w)
    first = results[0]
    return Summary(
        trace=first.trace,
        scaler=first.scaler,
        runs=len(results),
        tasks=len(waits),
        p50=percentile(waits, 50),
        p95=percentile(waits, 95),
        p99=percentile(waits, 99),
        max_wait=max(waits, default=float("nan")),
        p95_priority0=percentile(bare, 95),
        p95_prioritised=percentile(prio, 95),
        worker_seconds=statistics.fmean(r.worker_seconds for r in results),
        peak_replicas=max(r.peak_replicas for r in results),
        busy_removals=statistics.fmean(r.busy_removals for r in results),
        drain_seconds=statistics.fmean(r.drain_seconds for r in results),
        unfinished=sum(r.unfinished for r in results),
    )
