"""The local runtime's process supervision, with fake processes and an injected clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from celery_fleet_localrun.container import ContainerConfigError, ProcessSpec
from celery_fleet_localrun.supervisor import Backoff, PreparedPod, Supervisor, is_live


class FakeProcess:
    def __init__(self, pid: int, spec: ProcessSpec) -> None:
        self.pid, self.spec = pid, spec
        self.code: int | None = None
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        if self.code is None:
            self.code = -9


class FakeLauncher:
    def __init__(self) -> None:
        self.started: list[FakeProcess] = []

    def start(self, spec: ProcessSpec, log_path: Path) -> FakeProcess:
        process = FakeProcess(1000 + len(self.started), spec)
        self.started.append(process)
        return process

    def running(self) -> list[FakeProcess]:
        return [p for p in self.started if p.code is None]


class FakePreparer:
    def __init__(self, init: tuple[str, ...] = (), broker_port: int | None = 6379) -> None:
        self.init = init
        self.broker_port = broker_port
        self.fail_with: str | None = None
        self.cleaned: list[str] = []

    def prepare(self, pod: Mapping[str, Any]) -> PreparedPod:
        if self.fail_with:
            raise ContainerConfigError(self.fail_with)
        name = pod["metadata"]["name"]
        return PreparedPod(
            init=tuple(ProcessSpec(n, (n,), {}, Path("/")) for n in self.init),
            containers=(ProcessSpec("worker", ("celery", name), {}, Path("/"), broker_port=self.broker_port,
                                    probe_period=10, probe_failure_threshold=3),),
            log_dir=Path("/logs"),
        )  # fmt: skip

    def cleanup(self, pod: Mapping[str, Any]) -> None:
        self.cleaned.append(pod["metadata"]["name"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pod(name: str, *, grace: int = 30, deleting: bool = False, node: str | None = "node-0",
        restart_policy: str = "Always") -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["deletionGracePeriodSeconds"] = 0
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": grace, "restartPolicy": restart_policy,
                            "containers": [{"name": "worker", "image": "img"}]}  # fmt: skip
    if node:
        spec["nodeName"] = node
    return {"metadata": meta, "spec": spec, "status": {"phase": "Running"}}


class World:
    def __init__(self, preparer: FakePreparer | None = None, connected: bool = True) -> None:
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.preparer = preparer or FakePreparer()
        self.connected = connected
        self.probes = 0
        self.supervisor = Supervisor(
            self.launcher, self.preparer, self.probe, clock=self.clock,
            wall=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC), backoff=Backoff(initial=1, maximum=8, reset_after=60),
        )  # fmt: skip

    def probe(self, pid: int, port: int) -> bool:
        self.probes += 1
        return self.connected

    def tick(self, pods: list[dict[str, Any]], seconds: float = 0.5) -> None:
        self.supervisor.sync(pods)
        self.supervisor.step()
        self.clock.now += seconds

    def view(self, name: str) -> Any:
        return next(v for v in self.supervisor.views() if v.name == name)


@pytest.mark.parametrize(
    ("manifest", "live"),
    [
        pytest.param(pod("a"), True, id="scheduled"),
        pytest.param(pod("a", node=None), False, id="unscheduled"),
        pytest.param(pod("a", deleting=True), False, id="deleting"),
        pytest.param({**pod("a"), "status": {"phase": "Succeeded"}}, False, id="finished"),
    ],
)
def test_is_live(manifest: dict[str, Any], live: bool) -> None:
    assert is_live(manifest) is live


def test_one_process_per_scheduled_pod_ready_once_connected() -> None:
    world = World(connected=False)
    world.tick([pod("a"), pod("b"), pod("c", node=None)])
    assert sorted(p.spec.argv[1] for p in world.launcher.started) == ["a", "b"]
    assert not world.view("a").ready
    world.connected = True
    world.tick([pod("a"), pod("b")])
    assert world.view("a").ready and world.view("b").ready
    # The same pods again start nothing new.
    world.tick([pod("a"), pod("b")])
    assert len(world.launcher.started) == 2


def test_pod_gone_gets_sigterm_then_sigkill_after_its_grace() -> None:
    world = World()
    world.tick([pod("a", grace=10)])
    process = world.launcher.started[0]
    world.tick([])  # scaled down: the pod vanished (kwok removes deleted pods at once)
    assert process.signals == ["TERM"]
    world.clock.now += 9
    world.tick([])
    assert process.signals == ["TERM"], "killed before the grace period was over"
    world.clock.now += 1
    world.tick([])
    assert process.signals == ["TERM", "KILL"]
    world.tick([])
    assert world.supervisor.idle
    assert world.preparer.cleaned == ["a"]


def test_warm_shutdown_within_grace_is_not_killed() -> None:
    world = World()
    world.tick([pod("a", grace=30)])
    process = world.launcher.started[0]
    world.tick([pod("a", grace=30, deleting=True)])
    assert process.signals == ["TERM"]
    world.clock.now += 5
    process.code = 0  # Celery finished its running tasks and exited
    world.tick([])
    # The group is swept after the main process exits (leftover children), never before.
    assert process.signals == ["TERM", "KILL"]
    assert process.code == 0
    assert world.supervisor.idle


def test_crashed_process_restarts_with_doubling_backoff() -> None:
    world = World()
    world.tick([pod("a")], seconds=0)
    delays = []
    for _ in range(5):
        world.launcher.started[-1].code = 1
        crashed_at = world.clock.now
        world.tick([pod("a")], seconds=0)
        view = world.view("a")
        assert view.containers[0].waiting_reason == "CrashLoopBackOff"
        count = len(world.launcher.started)
        while len(world.launcher.started) == count:
            world.clock.now += 0.25
            world.tick([pod("a")], seconds=0)
        delays.append(world.clock.now - crashed_at)
    assert delays == [1, 2, 4, 8, 8]
    assert world.view("a").containers[0].restarts == 5
    assert world.view("a").containers[0].last_exit.code == 1


def test_backoff_resets_after_a_long_run() -> None:
    world = World()
    world.tick([pod("a")], seconds=0)
    world.launcher.started[-1].code = 1
    world.tick([pod("a")], seconds=1)
    world.tick([pod("a")], seconds=0)  # restarted after 1 s
    world.clock.now += 61  # then ran for longer than reset_after
    world.launcher.started[-1].code = 1
    world.tick([pod("a")], seconds=1)
    world.tick([pod("a")], seconds=0)
    assert len(world.launcher.started) == 3, "the second crash should restart after the initial 1 s again"


@pytest.mark.parametrize(
    ("policy", "code", "restarts"),
    [
        pytest.param("Always", 0, True, id="always-restarts-success"),
        pytest.param("OnFailure", 0, False, id="onfailure-success-stays-down"),
        pytest.param("OnFailure", 2, True, id="onfailure-failure-restarts"),
        pytest.param("Never", 2, False, id="never"),
    ],
)
def test_restart_policy(policy: str, code: int, restarts: bool) -> None:
    world = World()
    world.tick([pod("a", restart_policy=policy)], seconds=0)
    world.launcher.started[0].code = code
    world.tick([pod("a", restart_policy=policy)], seconds=5)
    world.tick([pod("a", restart_policy=policy)], seconds=0)
    assert (len(world.launcher.started) == 2) is restarts


def test_lost_broker_connection_unready_after_failure_threshold_at_probe_period() -> None:
    world = World()
    world.tick([pod("a")], seconds=0)  # started
    world.tick([pod("a")], seconds=0)  # probed
    assert world.view("a").ready
    world.connected = False
    probes = world.probes
    for _ in range(19):  # 9.5 s: no probe is due yet
        world.tick([pod("a")], seconds=0.5)
    assert world.probes == probes
    for _ in range(2):  # two misses: still ready
        world.clock.now += 10
        world.tick([pod("a")], seconds=0)
    assert world.view("a").ready
    world.clock.now += 10
    world.tick([pod("a")], seconds=0)
    assert not world.view("a").ready


def test_container_without_the_broker_probe_is_ready_once_running() -> None:
    world = World(FakePreparer(broker_port=None), connected=False)
    world.tick([pod("a")])
    assert world.view("a").ready
    assert world.probes == 0


def test_init_containers_run_in_order_before_the_container() -> None:
    world = World(FakePreparer(init=("copy", "migrate")))
    world.tick([pod("a")])
    assert [p.spec.container for p in world.launcher.started] == ["copy"]
    assert world.view("a").containers[0].waiting_reason == "PodInitializing"
    world.launcher.started[0].code = 0
    world.tick([pod("a")])
    world.tick([pod("a")])
    assert [p.spec.container for p in world.launcher.started] == ["copy", "migrate"]
    world.launcher.started[1].code = 3  # a failing init container is retried, the worker waits
    world.tick([pod("a")], seconds=2)
    world.tick([pod("a")])
    assert [p.spec.container for p in world.launcher.started] == ["copy", "migrate", "migrate"]
    world.launcher.started[2].code = 0
    world.tick([pod("a")])
    world.tick([pod("a")])
    assert [p.spec.container for p in world.launcher.started] == ["copy", "migrate", "migrate", "worker"]


def test_config_error_is_reported_and_retried() -> None:
    preparer = FakePreparer()
    preparer.fail_with = 'secret "demo-broker" not found in namespace ns'
    world = World(preparer)
    world.tick([pod("a")], seconds=0)
    container = world.view("a").containers[0]
    assert (container.waiting_reason, container.waiting_message) == (
        "CreateContainerConfigError",
        'secret "demo-broker" not found in namespace ns',
    )
    assert not world.launcher.started
    preparer.fail_with = None
    world.tick([pod("a")], seconds=0)
    assert not world.launcher.started, "retried before its back-off"
    world.clock.now += 1
    world.tick([pod("a")])
    assert len(world.launcher.started) == 1


def test_terminate_all_stops_everything() -> None:
    world = World()
    world.tick([pod("a"), pod("b")])
    world.supervisor.terminate_all()
    assert all(p.signals == ["TERM"] for p in world.launcher.started)
    for p in world.launcher.started:
        p.code = 0
    world.supervisor.step()
    assert world.supervisor.idle
