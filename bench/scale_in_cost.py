"""What asking the workers costs (issue 12): Redis commands and time per scale-in decision.

A real Redis and four real `celery worker` processes of the plain app (Celery's defaults, the
flags the operator gives a tier), asked the way the autoscaler asks before a scale-down
(`brokers.control.PidboxControl.census`, our own pidbox client). Redis commands come from
`INFO commandstats`; the workers' own traffic (BRPOP loops, pidbox) over an equal idle stretch is
measured and subtracted. "Before" is kombu's Mailbox (`CeleryControl`, 2026-12-01 run of this bench).
The poll itself is unchanged by scale-in: one read-only script per broker (see redis_depth.md).

Run: `.venv/bin/python bench/scale_in_cost.py` (no cluster needed). Writes bench/results/scale_in_cost.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, RedisServer, wait_for, write_result

from celery_fleet.brokers.control import ControlTarget, PidboxControl

PODS = [f"bench-{i}" for i in range(4)]
ROUNDS = 20
# kombu's Mailbox (CeleryControl), bench/results/scale_in_cost.md of 2026-12-01: commands, p50, p95.
BEFORE = {
    "census": "126.5, 178 ms, 396 ms (3 broadcasts, no active_queues)",
    "drain": "92.0, 28 ms, 75 ms",
    "silent": "120.0, 2192 ms, 2252 ms (2 s per broadcast)",
}


def start_worker(url: str, pod: str, log_dir: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "celery", "-A", "plainapp", "worker", "-Q", "work", "--concurrency", "1",
            "--prefetch-multiplier", "1", "-O", "fair", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel", "WARNING", "--hostname", f"celery@{pod}"]  # fmt: skip
    env = dict(os.environ, CELERY_BROKER_URL=url, POD_NAME=pod, PYTHONPATH=str(ROOT / "tests" / "support"))
    with (log_dir / f"{pod}.log").open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def commands(redis: object) -> int:
    stats = redis.info("commandstats")  # type: ignore[attr-defined]
    return sum(int(v["calls"]) for v in stats.values())


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="scale-in-cost-"))
    server = RedisServer(work)
    server.start()
    client = server.client()
    runner = asyncio.Runner()  # one event loop, as in the operator
    control = PidboxControl()
    target = ControlTarget(server.url)
    workers = [start_worker(server.url, pod, work) for pod in PODS]
    rows: list[str] = []
    try:
        wait_for(lambda: all(r.answered for r in runner.run(control.census(target, PODS)).values()),
                 timeout=120, message="all workers answer")  # fmt: skip

        def measure(what: str, before: str, action: object, rounds: int = ROUNDS) -> None:
            client.config_resetstat()
            sent = control.commands
            started = time.monotonic()
            times = []
            for _ in range(rounds):
                t = time.monotonic()
                runner.run(action())  # type: ignore[operator]
                times.append(time.monotonic() - t)
            spent = time.monotonic() - started
            busy = commands(client)
            ours = (control.commands - sent) / rounds
            client.config_resetstat()
            time.sleep(spent)  # the same stretch with nobody asking: the workers' own traffic
            idle = commands(client)
            per = (busy - idle) / rounds
            times.sort()
            p95 = times[int(0.95 * (len(times) - 1))]
            rows.append(f"| {what} | {per:.1f} ({ours:.1f} sent by the operator) | "
                        f"{statistics.median(times) * 1000:.0f} ms | {p95 * 1000:.0f} ms | {before} |")  # fmt: skip

        broadcasts = control.broadcasts
        measure("census of 4 idle workers (active, reserved, scheduled, active_queues)", BEFORE["census"],
                lambda: control.census(target, PODS))  # fmt: skip
        per_census = (control.broadcasts - broadcasts) / ROUNDS
        measure(
            "drain + undo: cancel_consumer then add_consumer, 1 worker, 1 queue",
            BEFORE["drain"],
            lambda: _drain_and_back(control, target),
        )
        os.kill(workers[3].pid, signal.SIGSTOP)
        try:
            measure("census of 4 workers, one SIGSTOPped (one 2 s deadline for the census)", BEFORE["silent"],
                    lambda: control.census(target, PODS), rounds=5)  # fmt: skip
        finally:
            os.kill(workers[3].pid, signal.SIGCONT)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)
        runner.run(control.aclose())
        runner.close()
        server.stop()

    body = "\n".join([
        "Redis commands and time per remote-control call the autoscaler makes before a scale-down "
        "(never per poll; a tier held by busy workers is asked again at most every 5 s).",
        "",
        "| call | Redis commands per call (workers' own traffic subtracted) | p50 | p95 | before: kombu Mailbox |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"A census publishes {per_census:g} commands in one round (one pipeline: bind the reply list, PUBLISH "
        "each), pops replies with a bounded script (one EVAL per wait step, 5 ms doubling to 50 ms) and ends "
        "with one pipeline (unbind, delete the list, SISMEMBER per silent node). The rest of the commands are "
        "the workers' replies (SMEMBERS of the reply binding + LPUSH each). Per scale-down decision the "
        "apiserver sees one LIST of the tier's pods, one PATCH per pod whose pod-deletion-cost changes, and "
        "the scale; per poll nothing changes (one read-only script per broker).",
    ])  # fmt: skip
    write_result("scale_in_cost", "Scale-in: the cost of asking the workers", body)


async def _drain_and_back(control: PidboxControl, target: ControlTarget) -> None:
    await control.cancel_consumer(target, PODS[:1], ["work"])
    await control.add_consumer(target, PODS[:1], ["work"])


if __name__ == "__main__":
    main()
