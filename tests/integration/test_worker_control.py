"""The scale-in adapter against real Celery workers (a plain app on Celery's defaults) and a real Redis.

No cluster: the remote-control calls the autoscaler makes before a scale-down, one by one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_fleet.brokers.control import CeleryControl, ControlTarget
from celery_fleet.planning.scale_in import WorkerReport
from tests.support.cluster import ROOT
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

APP_DIR = ROOT / "tests" / "support"


class Worker:
    """`celery -A plainapp worker` with the flags the operator gives a tier (hostname celery@<pod>)."""

    def __init__(
        self, url: str, pod: str, queue: str, log_dir: Path, argv: list[str] | None = None, **env: str
    ) -> None:
        self.pod = pod
        self.log = log_dir / f"{pod}.log"
        args = [sys.executable, "-m", "celery", *(argv or [
            "-A", "plainapp", "worker", "-Q", queue, "--concurrency", "1",
            "--pool", "prefork", "--prefetch-multiplier", "1", "-O", "fair", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel", "INFO", "--hostname", f"celery@{pod}",
        ])]  # fmt: skip
        full_env = dict(os.environ, CELERY_BROKER_URL=url, POD_NAME=pod, PYTHONPATH=str(APP_DIR), **env)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def control() -> Iterator[CeleryControl]:
    c = CeleryControl(timeout=1.5)
    yield c
    c.close()


def _census(control: CeleryControl, url: str, pods: list[str]) -> dict[str, WorkerReport]:
    return asyncio.run(control.census(ControlTarget(url), pods))


def _producer(url: str) -> Celery:
    app = Celery("producer", broker=url)
    app.conf.broker_connection_retry_on_startup = False
    return app


def test_census_sees_running_reserved_scheduled_and_silent_workers(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: CeleryControl, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "busy-0", "work", tmp_path))
    workers.append(Worker(url, "idle-1", "later", tmp_path))
    pods = ["busy-0", "idle-1"]
    wait_for(lambda: all(r.answered for r in _census(control, url, pods).values()), timeout=60,
             message="both workers answer remote control")  # fmt: skip

    producer = _producer(url)
    for _ in range(2):
        producer.send_task("plainapp.hold", args=[15], queue="work")
    for _ in range(3):
        producer.send_task("plainapp.hold", args=[1], queue="later", countdown=600)

    def settled() -> dict[str, WorkerReport] | None:
        c = _census(control, url, pods)
        return c if c["busy-0"].active == 1 and c["busy-0"].reserved == 1 and c["idle-1"].scheduled == 3 else None

    census = wait_for(settled, timeout=30, message="one running + one reserved on busy-0, 3 scheduled on idle-1")
    # Early ack: the running task is in no Redis key; the reserved one and the countdowns are in `unacked`.
    assert redis_db.hlen("unacked") == 4
    assert census["busy-0"].busy
    assert not census["idle-1"].busy  # scheduled (ETA) tasks are not work in progress

    # A stopped worker cannot answer: counted busy, and known to have remote control.
    os.kill(workers[1].proc.pid, signal.SIGSTOP)
    try:
        silent = _census(control, url, pods)["idle-1"]
    finally:
        os.kill(workers[1].proc.pid, signal.SIGCONT)
    assert (silent.answered, silent.remote_control, silent.busy) == (False, True, True)
    assert control.broadcasts > 0


def test_drain_stops_consuming_and_add_consumer_undoes_it(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: CeleryControl, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "drained-0", "work", tmp_path))
    wait_for(lambda: _census(control, url, ["drained-0"])["drained-0"].answered, timeout=60, message="worker answers")
    target = ControlTarget(url)

    assert asyncio.run(control.cancel_consumer(target, ["drained-0"], ["work"])) == {"drained-0"}
    _producer(url).send_task("plainapp.hold", args=[0.1], queue="work")
    queues = _producer(url).control.inspect(destination=["celery@drained-0"], timeout=2).active_queues()
    assert queues == {"celery@drained-0": []}
    assert redis_db.llen("work") == 1 and redis_db.llen("plain:started") == 0

    assert asyncio.run(control.add_consumer(target, ["drained-0"], ["work"])) == {"drained-0"}
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=30, message="the task runs once consuming again")


def test_worker_with_remote_control_off_is_reported_as_such(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: CeleryControl, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "mute-0", "work", tmp_path, PLAIN_REMOTE_CONTROL="0"))
    # Ready = consuming: the task it runs proves the worker is up.
    _producer(url).send_task("plainapp.hold", args=[0.1], queue="work")
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=60, message="the worker is up")
    report = _census(control, url, ["mute-0"])["mute-0"]
    assert (report.answered, report.remote_control, report.busy) == (False, False, False)


def test_the_operators_worker_arguments_with_shutdown_options_run_a_real_worker(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: CeleryControl, tmp_path: Path
) -> None:
    from celery_fleet.api.models import parse_pool
    from celery_fleet.planning.workload import worker_args

    spec = parse_pool({"app": "plainapp", "image": "i", "broker": {"url": "redis://r"}, "tiers": [
        {"name": "work", "queues": ["work"], "concurrency": 1, "replicas": {"min": 0, "max": 2},
         "disablePrefetch": True, "shutdown": {"softShutdownTimeoutSeconds": 7, "softShutdownOnIdle": True}},
    ]})  # fmt: skip
    argv = [a.replace("$(POD_NAME)", "args-0") for a in worker_args("plainapp", spec.tiers[0])]
    workers.append(Worker(redis_server.url, "args-0", "work", tmp_path, argv=argv))
    _producer(redis_server.url).send_task("plainapp.hold", args=[0.1], queue="work")
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=60,
             message=lambda: f"a task done; worker log:\n{workers[0].log.read_text()[-2000:]}")  # fmt: skip
    stats = _producer(redis_server.url).control.inspect(destination=["celery@args-0"], timeout=5).conf()
    conf = stats["celery@args-0"]
    assert conf["worker_soft_shutdown_timeout"] == 7.0
    assert conf["worker_enable_soft_shutdown_on_idle"] is True
    assert conf["worker_disable_prefetch"] is True
