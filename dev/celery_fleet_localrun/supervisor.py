# Just over 500 lines: the kubelet's pod lifecycle (init, run, restart, probe, stop) as one state machine.
"""The kubelet's job for local processes: one process per container of every scheduled pod.

Level-triggered: each tick the runtime hands in the pods it sees (`sync`) and calls `step`.

- A scheduled, live pod gets its init containers run one after the other (each must exit 0),
  then one process per container.
- A process that exits is restarted after a back-off that doubles per crash in a row
  (`restart_backoff` .. `restart_backoff_max`), reset once a process ran `backoff_reset`
  seconds; restartPolicy Never / OnFailure are honoured.
- A pod that goes away or is being deleted gets SIGTERM to each container's main process (a
  Celery worker starts its warm shutdown: running tasks finish), then SIGKILL to the whole process
  group once the grace period (the deletion's, else the pod's terminationGracePeriodSeconds) is
  over. kwok removes a deleted pod at once, so the process usually outlives its pod object, as a
  container outlives `kubectl delete --wait=false`.
- Readiness: a container carrying the operator's broker readiness probe is ready while its
  process tree holds an ESTABLISHED connection to the broker port (see `procfs`); other containers
  are ready once started, as the kubelet does without a probe. Before the first success the check
  runs every tick (a kubelet would wait for `periodSeconds`), then every `periodSeconds`, and
  `failureThreshold` misses in a row make it unready.

All I/O is injected (launcher, preparer, prober, clocks), so the state machine is unit-tested
with fakes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from celery_fleet.planning import backoff
from celery_fleet_localrun.container import ContainerConfigError, ProcessSpec, grace_seconds

log = logging.getLogger(__name__)

Manifest = Mapping[str, Any]


class LocalProcess(Protocol):
    pid: int

    def poll(self) -> int | None:
        """The exit code once the main process ended (negative: killed by that signal)."""

    def terminate(self) -> None:
        """SIGTERM to the main process (what the kubelet sends to a container's PID 1)."""

    def kill(self) -> None:
        """SIGKILL to the whole process group (the container is torn down)."""


class Launcher(Protocol):
    def start(self, spec: ProcessSpec, log_path: Path) -> LocalProcess: ...


@dataclass(frozen=True)
class PreparedPod:
    init: tuple[ProcessSpec, ...]
    containers: tuple[ProcessSpec, ...]
    log_dir: Path


class Preparer(Protocol):
    def prepare(self, pod: Manifest) -> PreparedPod:
        """Resolve env, write volumes, request tokens; raises ContainerConfigError."""

    def cleanup(self, pod: Manifest) -> None:
        """Remove what `prepare` wrote for the pod."""


Prober = Callable[[int, int], bool]


@dataclass(frozen=True)
class Backoff(backoff.Backoff):
    """The kubelet's restart back-off: doubling per crash in a row, reset after `reset_after` s up."""

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0


class Waiting(StrEnum):
    CREATING = "ContainerCreating"
    INITIALIZING = "PodInitializing"
    BACKOFF = "CrashLoopBackOff"
    CONFIG_ERROR = "CreateContainerConfigError"


@dataclass(frozen=True)
class Exit:
    code: int
    started_at: dt.datetime
    finished_at: dt.datetime

    @property
    def reason(self) -> str:
        return "Completed" if self.code == 0 else "Error"


@dataclass
class ContainerRun:
    """One container's process over its restarts."""

    name: str
    image: str
    spec: ProcessSpec | None = None
    process: LocalProcess | None = None
    started_at: dt.datetime | None = None
    started_mono: float = 0.0
    ready: bool = False
    restarts: int = 0
    streak: int = 0
    next_start: float = 0.0
    waiting: Waiting = Waiting.CREATING
    waiting_message: str = ""
    last_exit: Exit | None = None
    probe_failures: int = 0
    next_probe: float = 0.0
    completed: bool = False  # an init container that exited 0, or a container not to restart
    terminated_by_us: float | None = None  # when SIGTERM was sent

    def view(self) -> ContainerView:
        state: str
        if self.process is not None:
            state = "running"
        elif self.completed:
            state = "terminated"
        else:
            state = "waiting"
        return ContainerView(
            name=self.name,
            image=self.image,
            state=state,
            ready=self.ready and self.process is not None,
            restarts=self.restarts,
            pid=self.process.pid if self.process is not None else None,
            started_at=self.started_at,
            waiting_reason=self.waiting.value if state == "waiting" else None,
            waiting_message=self.waiting_message if state == "waiting" else None,
            last_exit=self.last_exit,
            probed=self.spec is not None and self.spec.broker_port is not None,
        )


@dataclass(frozen=True)
class ContainerView:
    """What is reported for one container (see `status`)."""

    name: str
    image: str
    state: str  # running | waiting | terminated
    ready: bool
    restarts: int
    pid: int | None
    started_at: dt.datetime | None
    waiting_reason: str | None
    waiting_message: str | None
    last_exit: Exit | None
    probed: bool = False


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    uid: str
    init: tuple[ContainerView, ...]
    containers: tuple[ContainerView, ...]

    @property
    def ready(self) -> bool:
        return bool(self.containers) and all(c.ready for c in self.containers)


class Phase(StrEnum):
    PREPARING = "Preparing"
    INIT = "Init"
    RUNNING = "Running"
    TERMINATING = "Terminating"
    DONE = "Done"


@dataclass
class LocalPod:
    pod: Manifest
    phase: Phase = Phase.PREPARING
    prepared: PreparedPod | None = None
    init: list[ContainerRun] = field(default_factory=list)
    containers: list[ContainerRun] = field(default_factory=list)
    next_prepare: float = 0.0
    prepare_streak: int = 0
    kill_at: float | None = None

    @property
    def meta(self) -> Manifest:
        return self.pod.get("metadata") or {}

    @property
    def label(self) -> str:
        return f"{self.meta.get('namespace')}/{self.meta.get('name')}"

    @property
    def restart_policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy") or "Always")

    def runs(self) -> list[ContainerRun]:
        return [*self.init, *self.containers]

    def view(self) -> PodView:
        return PodView(
            namespace=str(self.meta.get("namespace")),
            name=str(self.meta.get("name")),
            uid=str(self.meta.get("uid")),
            init=tuple(c.view() for c in self.init),
            containers=tuple(c.view() for c in self.containers),
        )


def is_live(pod: Manifest) -> bool:
    """Scheduled to a node, not being deleted, not finished: its containers should run."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (
        bool((pod.get("spec") or {}).get("nodeName"))
        and not meta.get("deletionTimestamp")
        and phase
        not in (
            "Succeeded",
            "Failed",
        )
    )


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Supervisor:
    def __init__(
        self,
        launcher: Launcher,
        preparer: Preparer,
        prober: Prober,
        *,
        clock: Callable[[], float],
        wall: Callable[[], dt.datetime] = _utc_now,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.launcher = launcher
        self.preparer = preparer
        self.prober = prober
        self.clock = clock
        self.wall = wall
        self.backoff = backoff
        self.pods: dict[str, LocalPod] = {}

    # -- what should run ---------------------------------------------------------------------------

    def sync(self, pods: Sequence[Manifest]) -> None:
        """The complete set of pods in scope as seen now; pods missing from it are gone."""
        now = self.clock()
        seen: set[str] = set()
        for pod in pods:
            uid = str((pod.get("metadata") or {}).get("uid"))
            seen.add(uid)
            local = self.pods.get(uid)
            if local is None:
                if is_live(pod):
                    self.pods[uid] = LocalPod(pod=pod)
                continue
            local.pod = pod
            if not is_live(pod) and local.phase not in (Phase.TERMINATING, Phase.DONE):
                self._terminate(local, now, grace_seconds(pod), "is being deleted")
        for uid, local in self.pods.items():
            if uid not in seen and local.phase not in (Phase.TERMINATING, Phase.DONE):
                self._terminate(local, now, grace_seconds(local.pod), "is gone")

    def terminate_all(self, reason: str = "stops with the local runtime") -> None:
        now = self.clock()
        for local in self.pods.values():
            if local.phase not in (Phase.TERMINATING, Phase.DONE):
                self._terminate(local, now, grace_seconds(local.pod), reason)

    @property
    def idle(self) -> bool:
        return not self.pods

    def views(self) -> list[PodView]:
        return [p.view() for p in self.pods.values() if p.phase is not Phase.TERMINATING]

    # -- acting ------------------------------------------------------------------------------------

    def step(self) -> None:
        now = self.clock()
        for uid, local in list(self.pods.items()):
            if local.phase is Phase.PREPARING:
                self._prepare(local, now)
            if local.phase is Phase.INIT:
                self._step_init(local, now)
            if local.phase is Phase.RUNNING:
                for run in local.containers:
                    self._step_container(local, run, now)
            if local.phase is Phase.TERMINATING:
                self._step_terminating(local, now)
            if local.phase is Phase.DONE:
                del self.pods[uid]
                try:
                    self.preparer.cleanup(local.pod)
                except OSError as exc:
                    log.warning("pod %s: could not remove its local files: %s", local.label, exc)

    def _prepare(self, local: LocalPod, now: float) -> None:
        if now < local.next_prepare:
            return
        spec = local.pod.get("spec") or {}
        images = {str(c.get("name")): str(c.get("image", "")) for c in spec.get("containers") or []}
        init_images = {str(c.get("name")): str(c.get("image", "")) for c in spec.get("initContainers") or []}
        try:
            prepared = self.preparer.prepare(local.pod)
        except ContainerConfigError as exc:
            local.prepare_streak += 1
            delay = self.backoff.delay(local.prepare_streak)
            local.next_prepare = now + delay
            message = str(exc)
            local.init = [ContainerRun(n, i, waiting=Waiting.INITIALIZING) for n, i in init_images.items()]
            local.containers = [
                ContainerRun(n, i, waiting=Waiting.CONFIG_ERROR, waiting_message=message) for n, i in images.items()
            ]
            log.warning("pod %s: cannot start: %s (retry in %.0fs)", local.label, message, delay)
            return
        local.prepared = prepared
        local.init = [ContainerRun(s.container, init_images.get(s.container, ""), spec=s) for s in prepared.init]
        local.containers = [
            ContainerRun(
                s.container,
                images.get(s.container, ""),
                spec=s,
                waiting=Waiting.INITIALIZING if prepared.init else Waiting.CREATING,
            )
            for s in prepared.containers
        ]
        local.phase = Phase.INIT if local.init else Phase.RUNNING

    def _log_path(self, local: LocalPod, run: ContainerRun) -> Path:
        assert local.prepared is not None
        return local.prepared.log_dir / f"{run.name}.log"

    def _start(self, local: LocalPod, run: ContainerRun, now: float) -> None:
        assert run.spec is not None
        try:
            run.process = self.launcher.start(run.spec, self._log_path(local, run))
        except OSError as exc:
            # A missing executable, say: the kubelet would report it and retry with back-off.
            run.streak += 1
            run.next_start = now + self.backoff.delay(run.streak)
            run.waiting, run.waiting_message = Waiting.BACKOFF, f"cannot start {run.spec.argv[0]!r}: {exc}"
            log.warning("pod %s: container %s: %s", local.label, run.name, run.waiting_message)
            return
        run.started_at = self.wall()
        run.started_mono = now
        # Without the broker probe a started container is ready, as with the kubelet.
        run.ready = run.spec.broker_port is None
        run.probe_failures = 0
        run.next_probe = now
        log.info("pod %s: container %s started as pid %d", local.label, run.name, run.process.pid)

    def _reap(self, local: LocalPod, run: ContainerRun, now: float) -> int | None:
        """The exit code when the container's process just ended (its group is then killed)."""
        if run.process is None:
            return None
        code = run.process.poll()
        if code is None:
            return None
        # Leftovers in the group (forked children) go with the container.
        run.process.kill()
        started = run.started_at or self.wall()
        run.last_exit = Exit(code=code, started_at=started, finished_at=self.wall())
        ran_for = now - run.started_mono
        if run.terminated_by_us is not None:
            how = "warm shutdown" if code == 0 else "stopped"
            log.info(
                "pod %s: container %s pid %d exited with %d %.1fs after SIGTERM (%s)",
                local.label, run.name, run.process.pid, code, now - run.terminated_by_us, how,
            )  # fmt: skip
        else:
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "pod %s: container %s pid %d exited with %d after %.1fs",
                local.label, run.name, run.process.pid, code, ran_for,
            )  # fmt: skip
        run.process = None
        run.ready = False
        if ran_for >= self.backoff.reset_after:
            run.streak = 0
        return code

    def _restart_later(self, local: LocalPod, run: ContainerRun, now: float, code: int) -> None:
        run.restarts += 1
        run.streak += 1
        delay = self.backoff.delay(run.streak)
        run.next_start = now + delay
        run.waiting = Waiting.BACKOFF
        run.waiting_message = f"exited with {code}; restarting in {delay:g}s"
        log.info("pod %s: container %s restarts in %gs (restart %d)", local.label, run.name, delay, run.restarts)

    def _step_init(self, local: LocalPod, now: float) -> None:
        for run in local.init:
            if run.completed:
                continue
            if run.process is None:
                if now >= run.next_start:
                    self._start(local, run, now)
                return
            code = self._reap(local, run, now)
            if code is None:
                return
            if code == 0:
                run.completed = True
                continue
            if local.restart_policy == "Never":
                run.completed = True
                run.waiting_message = f"init container exited with {code}"
                log.warning("pod %s: init container %s failed; restartPolicy Never", local.label, run.name)
                local.phase = Phase.DONE
                return
            self._restart_later(local, run, now, code)
            return
        local.phase = Phase.RUNNING
        for run in local.containers:
            run.waiting = Waiting.CREATING

    def _step_container(self, local: LocalPod, run: ContainerRun, now: float) -> None:
        if run.completed:
            return
        if run.process is None:
            if now >= run.next_start:
                self._start(local, run, now)
            return
        code = self._reap(local, run, now)
        if code is not None:
            policy = local.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                run.completed = True
                return
            self._restart_later(local, run, now, code)
            return
        self._probe(local, run, now)

    def _probe(self, local: LocalPod, run: ContainerRun, now: float) -> None:
        assert run.spec is not None and run.process is not None
        if run.spec.broker_port is None:
            run.ready = True
            return
        if now < run.next_probe:
            return
        ok = self.prober(run.process.pid, run.spec.broker_port)
        if ok:
            if not run.ready:
                log.info("pod %s: container %s is connected to the broker: ready", local.label, run.name)
            run.ready, run.probe_failures = True, 0
            run.next_probe = now + run.spec.probe_period
            return
        if not run.ready:
            return  # not ready yet: look again next tick
        run.probe_failures += 1
        run.next_probe = now + run.spec.probe_period
        if run.probe_failures >= run.spec.probe_failure_threshold:
            run.ready = False
            log.warning("pod %s: container %s lost its broker connection: not ready", local.label, run.name)

    def _terminate(self, local: LocalPod, now: float, grace: float, why: str) -> None:
        local.phase = Phase.TERMINATING
        local.kill_at = now + grace
        running = [r for r in local.runs() if r.process is not None]
        for run in running:
            assert run.process is not None
            run.terminated_by_us = now
            run.process.terminate()
        if running:
            pids = ", ".join(f"{r.name} pid {r.process.pid}" for r in running if r.process is not None)
            log.info("pod %s %s: SIGTERM to %s (grace %gs)", local.label, why, pids, grace)

    def _step_terminating(self, local: LocalPod, now: float) -> None:
        alive = False
        for run in local.runs():
            if run.process is None:
                continue
            if self._reap(local, run, now) is None:
                alive = True
        if not alive:
            local.phase = Phase.DONE
            return
        if local.kill_at is not None and now >= local.kill_at:
            for run in local.runs():
                if run.process is not None:
                    log.warning(
                        "pod %s: container %s pid %d still running after the grace period: SIGKILL",
                        local.label, run.name, run.process.pid,
                    )  # fmt: skip
                    run.process.kill()
            local.kill_at = None  # killed once; wait for the exits to be reaped
