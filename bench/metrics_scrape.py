"""What one /metrics scrape costs with 100 maximal pools, without and with the series caps (issue 24.4).

A maximal pool: 10 tiers x 32 queues x 10 priority steps, names at their longest (queue 200
characters, pool and namespace 63), written the way the autoscaler writes them
(`handlers.autoscaler.signals.PoolSeries`, the real `metrics.REGISTRY`). Then one scrape
(`prometheus_client.generate_latest`, what the HTTP handler runs) under tracemalloc: its peak is
the memory the operator needs on top of what it holds, for one scraper.

Run: `.venv/bin/python bench/metrics_scrape.py` (no cluster, no Redis). Writes bench/results/metrics_scrape.md.
"""

from __future__ import annotations

import gc
import logging
import time
import tracemalloc
from dataclasses import dataclass

from _harness import write_result
from prometheus_client import generate_latest

from celery_fleet import metrics
from celery_fleet.handlers.autoscaler.signals import PoolSeries

POOLS = 100
TIERS, QUEUES, STEPS = 10, 32, 10


@dataclass(frozen=True)
class Case:
    label: str
    per_pool: int
    per_namespace: int
    namespaces: int  # the pools spread over this many namespaces


def populate(series: PoolSeries, case: Case) -> list[tuple[str, str]]:
    keys = []
    for p in range(POOLS):
        namespace = f"tenant-{p % case.namespaces:03d}".ljust(63, "n")
        pool = f"pool-{p:03d}".ljust(63, "p")
        keys.append((namespace, pool))
        series.set(metrics.BROKER_UP, (namespace, pool), 1)
        for t in range(TIERS):
            tier = f"tier-{t}".ljust(63, "t")
            for q in range(QUEUES):
                queue = f"queue-{q:02d}-".ljust(200, "q")
                for step in range(STEPS):
                    series.set(metrics.QUEUE_DEPTH, (namespace, pool, tier, queue, str(step)), q * step)
                series.set(metrics.IN_FLIGHT, (namespace, pool, tier, queue), q)
            for gauge in (metrics.DESIRED_REPLICAS, metrics.CURRENT_REPLICAS, metrics.MAX_REPLICAS,
                          metrics.BUSY_WORKERS, metrics.SCHEDULED_TASKS, metrics.STALE_UNACKED):  # fmt: skip
                series.set(gauge, (namespace, pool, tier), 3)
    return keys


def measure(case: Case) -> dict[str, float]:
    metrics.SERIES_BUDGET.configure(case.per_pool, case.per_namespace)
    series = PoolSeries()
    keys = populate(series, case)
    held = sum(metrics.SERIES_BUDGET.held(k) for k in keys)
    dropped = sum(metrics.SERIES_BUDGET.left_out(k) for k in keys)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    body = generate_latest(metrics.REGISTRY)
    seconds = time.perf_counter() - started
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for key in keys:
        series.forget(key)
    del body
    gc.collect()
    return {"series": held, "dropped": dropped, "peak_mb": peak / 2**20, "seconds": seconds,
            "bytes_mb": 0.0}  # fmt: skip


def main() -> None:
    logging.getLogger("celery_fleet").setLevel(logging.ERROR)  # one warning per capped pool: 300 lines here
    cases = [
        Case("no caps (before)", 0, 0, 10),
        Case(f"caps {metrics.DEFAULT_SERIES_PER_POOL}/pool, {metrics.DEFAULT_SERIES_PER_NAMESPACE}/namespace; "
             "100 namespaces of 1 pool", metrics.DEFAULT_SERIES_PER_POOL, metrics.DEFAULT_SERIES_PER_NAMESPACE, 100),
        Case("same caps; 10 namespaces of 10 pools", metrics.DEFAULT_SERIES_PER_POOL,
             metrics.DEFAULT_SERIES_PER_NAMESPACE, 10),
        Case("same caps; 1 namespace of 100 pools", metrics.DEFAULT_SERIES_PER_POOL,
             metrics.DEFAULT_SERIES_PER_NAMESPACE, 1),
    ]  # fmt: skip
    rows = []
    for case in cases:
        r = measure(case)
        rows.append(f"| {case.label} | {int(r['series']):,} | {int(r['dropped']):,} | {r['peak_mb']:.0f} MB "
                    f"| {r['seconds'] * 1000:.0f} ms |")  # fmt: skip
    body = (
        f"{POOLS} maximal pools ({TIERS} tiers x {QUEUES} queues x {STEPS} priority steps, longest names), "
        "written through `PoolSeries` into the real registry; one scrape (`generate_latest`) under "
        "tracemalloc. Peak = memory the scrape allocates on top of what the operator holds.\n\n"
        "| case | series kept | series left out (counted in celery_fleet_metric_series_dropped_total) "
        "| scrape peak | scrape time |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "The per-pool cap applies to per-queue series (depth per priority list, in flight), the ones that "
        "grow with the spec; tier and pool series (at most 71 per pool) count only towards "
        "the namespace's cap. Each pool over its cap is logged once. Scrape times are under "
        "tracemalloc, which slows allocation-heavy code several times: compare them, do not quote them."
    )
    write_result("metrics_scrape", "One /metrics scrape: 100 maximal pools, before and after the series caps", body)


if __name__ == "__main__":
    main()
