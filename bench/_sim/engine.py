"""The simulator: one Celery queue on Redis (its priority sub-lists), one tier Deployment of workers.

Discrete time: the world advances in steps of ``dt`` (0.1 s by default); inside a step, task
starts and finishes keep their exact times (a task starts at max(its arrival, the moment a worker
process freed), not at the step boundary), so the step size only bounds when autoscalers act.

What is modelled, and why:

* Redis lists as kombu lays them out: priority ``p`` goes to the sub-list of the highest step <= p
  (step 0 is the bare queue name, others ``queue + "\\x06\\x16" + step``); producers LPUSH, workers
  BRPOP the lists in step order, so step 0 always drains first and each list is FIFO.
* Workers: ``concurrency`` processes per pod and ``concurrency * prefetch_multiplier`` messages
  reserved at most (-O fair: a process only gets a message when free). A worker with room issues
  one BRPOP and takes one message per reply; Redis serves blocked clients first come, first served,
  so workers with room take turns (a worker goes to the back of the line after each message).
* In flight: reserved + running messages (kombu's ``unacked``), what the operator counts.
* Pods: created when spec.replicas rises, consuming after a start-up delay (scheduling, image,
  celery boot; uniform in ``startup_delay``, drawn per pod from the seed).
* Scale-in as the ReplicaSet controller does it: not-ready pods first, then the most recently
  ready (it does not know which workers are busy: no pod-deletion-cost). ``scale_in="idle-first"``
  models a scaler that sets ``controller.kubernetes.io/pod-deletion-cost`` from each pod's load.
  A removed pod gets SIGTERM: a warm shutdown. It stops consuming, its reserved-but-not-started
  messages go back to the head of their lists (kombu restores unacked messages on close), its
  running tasks finish (the grace period covers the time limit), and it costs worker-seconds until
  the last one ends.
* Cost: worker-seconds = the sum over pods of (end - creation), start-up and draining included.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from celery_fleet.api.models import Tier

from .traces import DEFAULT_PRIORITY_STEPS, Task, Trace, priority_step
from .view import Autoscaler, FleetView

__all__ = ["FleetParams", "Samples", "SimResult", "list_key", "percentile", "simulate"]

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport separator between queue name and step


def list_key(queue: str, step: int) -> str:
    """The Redis list holding ``queue``'s messages of priority ``step`` (kombu's ``_q_for_pri``)."""
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


@dataclass(frozen=True)
class FleetParams:
    queue: str
    concurrency: int
    initial_replicas: int
    prefetch_multiplier: int = 1
    startup_delay: tuple[float, float] = (10.0, 20.0)
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    dt: float = 0.1
    sample_every: float = 1.0
    scale_in: Literal["replicaset", "idle-first"] = "replicaset"
    # After the horizon, keep going until every task ran (each scaler pays for its own tail).
    max_overrun: float = 3600.0
    # Replayed start-ups (seconds, the n-th pod created gets the n-th, cycling); None: drawn from startup_delay.
    startup_times: tuple[float, ...] | None = None

    @classmethod
    def for_tier(cls, tier: Tier, *, initial_replicas: int | None = None, **overrides: object) -> FleetParams:
        """The fleet of a tier: its first queue, concurrency and prefetch, starting at replicas.min."""
        return cls(
            queue=tier.queues[0],
            concurrency=tier.concurrency,
            prefetch_multiplier=tier.prefetch_multiplier,
            initial_replicas=tier.replicas.min if initial_replicas is None else initial_replicas,
            **overrides,  # type: ignore[arg-type]  # checked by the dataclass constructor at run time
        )


@dataclass
class Samples:
    """One row every ``sample_every`` seconds."""

    t: list[float] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)  # every sub-list
    queued_bare: list[int] = field(default_factory=list)  # the bare list only (what LLEN queue sees)
    in_flight: list[int] = field(default_factory=list)
    spec_replicas: list[int] = field(default_factory=list)
    pods: list[int] = field(default_factory=list)  # every pod that costs: starting, ready, draining
    ready: list[int] = field(default_factory=list)  # ready pods still taking work


@dataclass
class SimResult:
    trace: str
    scaler: str
    seed: int
    arrivals: list[float]
    priorities: list[int]
    starts: list[float]  # nan: never started
    finishes: list[float]
    worker_seconds: float
    peak_replicas: int  # highest spec.replicas
    peak_pods: int  # highest count of pods alive (draining ones included)
    busy_removals: int  # pods picked for scale-in while running tasks
    drain_seconds: float  # worker-seconds those pods spent finishing their tasks after removal
    end: float
    horizon: float
    samples: Samples

    @property
    def waits(self) -> list[float]:
        """Enqueue -> start per task, in task id order (a task never started counts until the end)."""
        return [(self.end if math.isnan(s) else s) - a for a, s in zip(self.arrivals, self.starts, strict=True)]

    @property
    def unfinished(self) -> int:
        return sum(1 for f in self.finishes if math.isnan(f))


class _Pod:
    __slots__ = (
        "created",
        "draining",
        "ended",
        "id",
        "ready",
        "ready_at",
        "removed_at",
        "reserved",
        "running",
        "waiting",
    )

    def __init__(self, pod_id: int, created: float, ready_at: float) -> None:
        self.id = pod_id
        self.created = created
        self.ready_at = ready_at
        self.ready = False
        self.draining = False
        self.ended: float | None = None
        self.removed_at: float | None = None
        self.running = 0
        self.reserved: deque[Task] = deque()
        self.waiting = False  # blocked in BRPOP (it has room for another message)


class _World:
    def __init__(self, trace: Trace, scaler: Autoscaler, params: FleetParams, seed: int) -> None:
        self.trace = trace
        self.scaler = scaler
        self.p = params
        self.rng = random.Random(f"pods/{seed}")
        self.seed = seed
        self.steps = tuple(sorted(params.priority_steps))
        self.keys = {s: list_key(params.queue, s) for s in self.steps}
        self.lists: dict[int, deque[Task]] = {s: deque() for s in self.steps}
        self.step_of = [priority_step(t.priority, self.steps) for t in trace.tasks]
        n = len(trace.tasks)
        self.starts = [math.nan] * n
        self.finishes = [math.nan] * n
        self.done = 0
        self.pods: list[_Pod] = []
        self.cold = 0  # pods created with a start-up (not warm at t=0)
        self.deployment: list[_Pod] = []  # the ReplicaSet's pods: not terminating
        self.pending: list[tuple[float, int]] = []  # (ready_at, pod id)
        self.capacity = params.concurrency * params.prefetch_multiplier
        self.blocked: deque[tuple[_Pod, float]] = deque()  # workers in BRPOP, and since when
        self.running: list[tuple[float, int, int]] = []  # (end, task id, pod id)
        self.in_flight = 0
        self.delivered: dict[int, float] = {}  # task id -> delivery time (kombu's unacked_index)
        self.spec = params.initial_replicas
        self.peak_replicas = self.spec
        self.peak_pods = 0
        self.busy_removals = 0
        self.samples = Samples()
        for _ in range(params.initial_replicas):
            self._create(0.0, warm=True)

    # -- pods ---------------------------------------------------------------------------------------

    def _create(self, now: float, *, warm: bool = False) -> None:
        lo, hi = self.p.startup_delay
        if warm:
            ready_at = now
        elif self.p.startup_times:
            ready_at = now + self.p.startup_times[self.cold % len(self.p.startup_times)]
        else:
            ready_at = now + self.rng.uniform(lo, hi)
        self.cold += 0 if warm else 1
        pod = _Pod(len(self.pods), now, ready_at)
        self.pods.append(pod)
        self.deployment.append(pod)
        heapq.heappush(self.pending, (ready_at, pod.id))

    def _become_ready(self, until: float) -> None:
        while self.pending and self.pending[0][0] <= until:
            ready_at, pod_id = heapq.heappop(self.pending)
            pod = self.pods[pod_id]
            if pod.ended is not None or pod.draining:
                continue
            pod.ready = True
            self._block(pod, ready_at)

    def _block(self, pod: _Pod, since: float) -> None:
        if not pod.waiting and not pod.draining and pod.running + len(pod.reserved) < self.capacity:
            pod.waiting = True
            self.blocked.append((pod, since))

    def _rank(self, pod: _Pod) -> tuple[float, ...]:
        # Lowest first is removed first (ReplicaSet: not ready < ready; newer readiness first).
        # Ties go to the newer pod, as the ReplicaSet's last resort compares creation times.
        age = -pod.ready_at if pod.ready else -pod.created
        if self.p.scale_in == "idle-first":
            return (float(pod.ready), float(pod.running + len(pod.reserved)), age, -pod.id)
        return (float(pod.ready), age, -pod.id)

    def _reconcile(self, now: float) -> None:
        alive = len(self.deployment)
        if self.spec > alive:
            for _ in range(self.spec - alive):
                self._create(now)
        elif self.spec < alive:
            victims = sorted(self.deployment, key=self._rank)[: alive - self.spec]
            for pod in victims:
                self._remove(pod, now)
            gone = {p.id for p in victims}
            self.deployment = [p for p in self.deployment if p.id not in gone]

    def _remove(self, pod: _Pod, now: float) -> None:
        pod.removed_at = now
        if not pod.ready:
            pod.ended = now  # never consumed: deleted while starting
            return
        pod.draining = True
        # Reserved, not started: back to the head of their lists, earliest reserved next out.
        for task in reversed(pod.reserved):
            self.lists[self.step_of[task.id]].append(task)
            self.delivered.pop(task.id, None)
        self.in_flight -= len(pod.reserved)
        pod.reserved.clear()
        if pod.running:
            self.busy_removals += 1
        else:
            pod.ended = now

    # -- tasks --------------------------------------------------------------------------------------

    def _start(self, task: Task, pod: _Pod, at: float) -> None:
        self.starts[task.id] = at
        pod.running += 1
        heapq.heappush(self.running, (at + task.duration, task.id, pod.id))

    def _finish_until(self, until: float) -> None:
        while self.running and self.running[0][0] <= until:
            end, task_id, pod_id = heapq.heappop(self.running)
            pod = self.pods[pod_id]
            self.finishes[task_id] = end
            self.done += 1
            self.in_flight -= 1
            self.delivered.pop(task_id, None)
            pod.running -= 1
            if pod.reserved and not pod.draining:
                self._start(pod.reserved.popleft(), pod, end)
            if pod.draining:
                if pod.running == 0:
                    pod.ended = end
            else:
                self._block(pod, end)

    def _dispatch(self) -> None:
        lists = [self.lists[s] for s in self.steps]
        while self.blocked:
            source = next((q for q in lists if q), None)
            if source is None:
                return
            pod, since = self.blocked.popleft()
            pod.waiting = False
            if pod.draining or pod.ended is not None:
                continue  # removed while it waited
            task = source.pop()
            self.in_flight += 1
            at = max(since, task.arrival)
            self.delivered[task.id] = at
            if pod.running < self.p.concurrency:
                self._start(task, pod, at)
            else:
                pod.reserved.append(task)
            self._block(pod, at)

    # -- the loop -----------------------------------------------------------------------------------

    def view(self, now: float | None = None) -> FleetView:
        ages = None if now is None else {str(i): now - at for i, at in self.delivered.items()}
        return FleetView(
            list_lengths={self.keys[s]: len(q) for s, q in self.lists.items()},
            in_flight=self.in_flight,
            spec_replicas=self.spec,
            status_replicas=len(self.deployment),
            ready_replicas=sum(1 for p in self.deployment if p.ready),
            workers=tuple((p.id, p.running, len(p.reserved)) for p in self.deployment if p.ready),
            in_flight_ages=ages,
        )

    def _sample(self, now: float) -> None:
        s = self.samples
        s.t.append(now)
        s.queued.append(sum(len(q) for q in self.lists.values()))
        s.queued_bare.append(len(self.lists[self.steps[0]]))
        s.in_flight.append(self.in_flight)
        s.spec_replicas.append(self.spec)
        alive = sum(1 for p in self.pods if p.ended is None)
        s.pods.append(alive)
        s.ready.append(sum(1 for p in self.deployment if p.ready))
        self.peak_pods = max(self.peak_pods, alive)

    def run(self) -> SimResult:
        p, tasks = self.p, self.trace.tasks
        n, nxt = len(tasks), 0
        next_sample = 0.0
        limit = self.trace.horizon + p.max_overrun
        k = 0
        now = 0.0
        while True:
            k += 1
            now = round(k * p.dt, 9)
            self._become_ready(now)
            while nxt < n and tasks[nxt].arrival <= now:
                t = tasks[nxt]
                self.lists[self.step_of[t.id]].appendleft(t)
                nxt += 1
            self._finish_until(now)
            self._dispatch()
            while self.running and self.running[0][0] <= now:  # tasks shorter than the rest of the step
                self._finish_until(now)
                self._dispatch()
            guard = 0
            while self.scaler.due() <= now + 1e-9 and guard < 1000:
                guard += 1
                desired = self.scaler.tick(now, self.view(now))
                if desired is not None and desired != self.spec:
                    self.spec = desired
                    self.peak_replicas = max(self.peak_replicas, desired)
                    self._reconcile(now)
                    self._become_ready(now)
                    self._dispatch()
            if now + 1e-9 >= next_sample:
                self._sample(now)
                next_sample += p.sample_every
            if (now >= self.trace.horizon and self.done == n) or now >= limit:
                break
        return self._result(now)

    def _result(self, end: float) -> SimResult:
        worker_seconds = sum((end if pod.ended is None else pod.ended) - pod.created for pod in self.pods)
        drain = sum(
            (end if pod.ended is None else pod.ended) - pod.removed_at
            for pod in self.pods
            if pod.removed_at is not None and pod.ready
        )
        return SimResult(
            trace=self.trace.name,
            scaler=self.scaler.name,
            seed=self.seed,
            arrivals=[t.arrival for t in self.trace.tasks],
            priorities=[t.priority for t in self.trace.tasks],
            starts=self.starts,
            finishes=self.finishes,
            worker_seconds=worker_seconds,
            peak_replicas=self.peak_replicas,
            peak_pods=self.peak_pods,
            busy_removals=self.busy_removals,
            drain_seconds=drain,
            end=end,
            horizon=self.trace.horizon,
            samples=self.samples,
        )


def simulate(trace: Trace, scaler: Autoscaler, params: FleetParams, *, seed: int = 0) -> SimResult:
    """Replay ``trace`` against a tier fleet driven by ``scaler``; deterministic for a given seed."""
    if params.dt <= 0:
        raise ValueError("dt must be > 0")
    return _World(trace, scaler, params, seed).run()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
