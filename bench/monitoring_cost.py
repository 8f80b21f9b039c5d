"""What Flower's and celery-exporter's signals cost the broker (issue 26): Redis commands and bytes of
3 real `celery worker` processes of the plain app, idle and per task, with each tier.monitoring toggle.

Each variant runs the operator's worker flags (planning.workload.worker_args) with the toggle applied;
Redis figures come from `INFO commandstats` and `INFO stats` (total_net_input_bytes) over a fixed idle
window, then over a batch of no-op tasks.

Run: `.venv/bin/python bench/monitoring_cost.py` (no cluster needed). Writes bench/results/monitoring_cost.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import ROOT, RedisServer, wait_for, write_result

from celery_fleet.api.models import Monitoring, ReplicaBounds, Tier
from celery_fleet.planning.workload import worker_args

PODS = [f"bench-{i}" for i in range(3)]
IDLE_SECONDS = 20
TASKS = 200
VARIANTS = {
    "all off (default)": Monitoring(),
    "events": Monitoring(events=True),
    "heartbeat": Monitoring(heartbeat=True),
    "events + heartbeat (Flower, celery-exporter)": Monitoring(events=True, heartbeat=True),
    "events + heartbeat + gossip + mingle (Celery's defaults)": Monitoring(
        events=True, heartbeat=True, gossip=True, mingle=True
    ),
}


def start_worker(url: str, pod: str, monitoring: Monitoring, log: Path) -> subprocess.Popen[bytes]:
    tier = Tier(name="t", queues=["work"], concurrency=1, replicas=ReplicaBounds(min=0, max=1), monitoring=monitoring)
    args = [a.replace("$(POD_NAME)", pod) for a in worker_args("plainapp", tier)]
    args[args.index("--loglevel") + 1] = "INFO"
    env = dict(os.environ, CELERY_BROKER_URL=url, POD_NAME=pod, PYTHONPATH=str(ROOT / "tests" / "support"))
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "celery", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def totals(client: Any) -> tuple[dict[str, int], int, int]:
    """Calls per command, bytes into and out of Redis (gossip shows in the output: every worker reads every
    other worker's events)."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    net = client.info("stats")
    return calls, int(net["total_net_input_bytes"]), int(net["total_net_output_bytes"])


def run(name: str, monitoring: Monitoring, work: Path) -> str:
    server = RedisServer(work)
    server.workdir.mkdir(parents=True, exist_ok=True)
    server.start()
    client = server.client()
    logs = [server.workdir / f"{pod}.log" for pod in PODS]
    started = time.monotonic()
    workers = [start_worker(server.url, pod, monitoring, log) for pod, log in zip(PODS, logs, strict=True)]
    try:
        wait_for(lambda: all(b"ready." in log.read_bytes() for log in logs if log.exists()) and
                 all(log.exists() for log in logs), timeout=120, message=f"{name}: workers ready")  # fmt: skip
        startup = time.monotonic() - started
        client.config_resetstat()
        time.sleep(IDLE_SECONDS)  # a fixed measuring window, not a wait for a condition
        idle, idle_bytes, idle_out = totals(client)
        client.config_resetstat()
        sys.path.insert(0, str(ROOT / "tests" / "support"))
        os.environ["CELERY_BROKER_URL"] = server.url
        from plainapp import app

        app.conf.broker_url = server.url
        with app.connection_for_write() as conn:
            for _ in range(TASKS):
                app.send_task("plainapp.hold", args=[0], queue="work", connection=conn)
        done = "plain:done"
        wait_for(lambda: client.llen(done) >= TASKS, timeout=120, message=f"{name}: {TASKS} tasks done")
        busy, busy_bytes, busy_out = totals(client)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)
        server.stop()
    publish_idle = idle.get("publish", 0) / IDLE_SECONDS / len(PODS)
    per_task = sum(busy.values()) / TASKS
    return (
        f"| {name} | {sum(idle.values()) / IDLE_SECONDS:.1f} | {publish_idle:.2f} | "
        f"{idle_bytes / IDLE_SECONDS / 1024:.1f} | {idle_out / IDLE_SECONDS / 1024:.1f} | {per_task:.1f} | "
        f"{busy.get('publish', 0) / TASKS:.1f} | {busy_bytes / TASKS / 1024:.2f} | {busy_out / TASKS / 1024:.2f} | "
        f"{startup:.1f} s |"
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="monitoring-cost-"))
    # A fresh directory (Redis data, worker logs) per variant.
    rows = [run(name, monitoring, work / str(i)) for i, (name, monitoring) in enumerate(VARIANTS.items())]
    body = "\n".join([
        f"{len(PODS)} idle workers (prefork, concurrency 1) of the plain app for {IDLE_SECONDS} s, then "
        f"{TASKS} no-op tasks (`plainapp.hold(0)`, which itself writes one RPUSH per start and finish).",
        "",
        "| tier.monitoring | idle: commands/s (3 workers) | idle: PUBLISH/s per worker | idle: KiB/s in | "
        "idle: KiB/s out | per task: commands | per task: PUBLISH | per task: KiB in | per task: KiB out | "
        "start to ready |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    write_result("monitoring_cost", "Monitoring toggles: what events, heartbeats, gossip and mingle cost Redis", body)


if __name__ == "__main__":
    main()
