"""An offline oracle: a cheap pod schedule that starts every task within the wait target, knowing the future.

How it is computed (greedy, one pass over the trace in arrival order, priorities ignored):

* Each task must start by ``arrival + target``. It goes to the first pod (in creation order) with a
  slot free by then, starting at max(arrival, slot free): first-fit packs work onto the oldest pods,
  so the newer ones go idle and end.
* When no pod can start it in time, a pod is added, ready exactly at the arrival (created one
  start-up earlier: the oracle knows the burst is coming), up to ``replicas.max``; at the maximum
  the task takes the earliest free slot and waits longer than the target.
* Pod lives, ski-rental with foresight: a pod idle for longer than its start-up ends and is created
  again for its next task (cheaper than staying); the ``replicas.min`` pods never end.
* Cost = sum over lives of (start-up + ready -> last task end), the same worker-seconds the
  simulator charges (creation -> exit).

With ``late_fraction`` 0 every task meets the target (where ``replicas.max`` allows); with 0.05 (a
p95 target) the first tasks that would need a new pod wait for a free slot instead while 5 % of the
trace lasts, which the traces here find only 1-3 % cheaper. Either way it is a greedy schedule that
meets the target, so its cost bounds the cheapest one from above: "<= 1.2x the oracle" is lenient
by however far the greedy is from the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import percentile
from .traces import Trace

__all__ = ["OracleResult", "oracle"]


@dataclass(frozen=True)
class OracleResult:
    worker_seconds: float
    p95: float  # of the oracle's own (FIFO) waits
    max_wait: float
    pods: int  # distinct pods used at once, at most
    lives: int  # pod lives (each a start-up paid, the warm min pods excluded)


class _Pod:
    __slots__ = ("free", "last_end", "life_ready", "lives", "spent", "warm")

    def __init__(self, concurrency: int, ready: float, *, warm: bool) -> None:
        self.free = [ready] * concurrency
        self.warm = warm
        self.life_ready = ready
        self.last_end = ready
        self.lives = 0 if warm else 1
        self.spent = 0.0  # closed lives' cost


def oracle(
    trace: Trace,
    *,
    target: float,
    concurrency: int,
    min_pods: int,
    max_pods: int,
    startup: float | Sequence[float],
    late_fraction: float = 0.0,
) -> OracleResult:
    """``startup``: seconds per pod start (a sequence: the n-th start gets the n-th, cycling).
    ``late_fraction``: this share of the tasks may start after the target (0.05 for a p95 target):
    a task that would need a new pod waits for the earliest free slot instead, while the share lasts."""
    starts = [startup] if isinstance(startup, (int, float)) else list(startup)
    n_start = 0

    def next_startup() -> float:
        nonlocal n_start
        t = float(starts[n_start % len(starts)])
        n_start += 1
        return t

    pods = [_Pod(concurrency, 0.0, warm=True) for _ in range(min_pods)]
    startup_of: dict[int, float] = {}
    waits: list[float] = []
    late_left = int(late_fraction * len(trace.tasks))
    for task in trace.tasks:
        a, deadline = task.arrival, task.arrival + target
        chosen: tuple[_Pod, int, float] | None = None
        for pod in pods:
            i = min(range(concurrency), key=pod.free.__getitem__)
            start = max(a, pod.free[i])
            if start <= deadline:
                chosen = (pod, i, start)
                break
        if chosen is None and late_left > 0 and pods:
            late_left -= 1  # cheaper than a pod: this one is among the tasks the percentile leaves out
            pod = min(pods, key=lambda p: min(p.free))
            i = min(range(concurrency), key=pod.free.__getitem__)
            chosen = (pod, i, max(a, pod.free[i]))
        if chosen is None:
            if len(pods) < max_pods:
                pod = _Pod(concurrency, a, warm=False)
                startup_of[id(pod)] = next_startup()
                pods.append(pod)
                chosen = (pod, 0, a)
            else:
                pod = min(pods, key=lambda p: min(p.free))
                i = min(range(concurrency), key=pod.free.__getitem__)
                chosen = (pod, i, max(a, pod.free[i]))
        pod, i, start = chosen
        if not pod.warm and start - pod.last_end > startup_of[id(pod)]:
            # Idle longer than a start-up: it ended after its last task and starts again for this one.
            pod.spent += startup_of[id(pod)] + pod.last_end - pod.life_ready
            startup_of[id(pod)] = next_startup()
            pod.life_ready, pod.lives = start, pod.lives + 1
        pod.free[i] = start + task.duration
        pod.last_end = max(pod.last_end, pod.free[i])
        waits.append(start - a)
    end = max([trace.horizon, *(p.last_end for p in pods)])
    total = 0.0
    for pod in pods:
        if pod.warm:
            total += end
        else:
            total += pod.spent + startup_of[id(pod)] + pod.last_end - pod.life_ready
    return OracleResult(
        worker_seconds=total,
        p95=percentile(waits, 95),
        max_wait=max(waits, default=math.nan),
        pods=len(pods),
        lives=sum(p.lives for p in pods),
    )
