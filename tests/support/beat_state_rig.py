"""Electors running `celery beat` with the LeaseScheduler (tests/support/beat_slots_app.py), as a
CeleryBeat pod runs it: the single file, --schedule-state, the shared state on the Lease."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.beatapp import BeatElector, Timings, admin_connection, standalone_elector

ROOT = Path(__file__).resolve().parents[2]
LEASE_SCHEDULER = "celery_fleet.beat.scheduler:LeaseScheduler"


def start_slots_elector(
    identity: str,
    *,
    workdir: Path,
    kubeconfig: Path,
    namespace: str,
    lease: str,
    broker_url: str,
    timings: Timings,
    server: str | None = None,
    queue: str = "slots",
    extra_env: dict[str, str] | None = None,
    per_pod_file: bool = False,
) -> BeatElector:
    """`per_pod_file`: Celery's PersistentScheduler with a schedule file of its own, as before issue 29."""
    elector = standalone_elector(workdir)
    log_path = workdir / f"{identity}.log"
    argv = [
        sys.executable, str(elector),
        *admin_connection(kubeconfig, server),
        "--namespace", namespace, "--lease", lease, "--identity", identity,
        *timings.flags(), *([] if per_pod_file else ["--schedule-state"]),
        "--",
        sys.executable, "-m", "celery", "-A", "tests.support.beat_slots_app", "beat", "--loglevel", "INFO",
    ]  # fmt: skip
    if per_pod_file:
        argv += ["--scheduler", "celery.beat:PersistentScheduler", "--schedule", str(workdir / f"{identity}-schedule")]
    else:
        argv += ["--scheduler", LEASE_SCHEDULER]
    env = {
        **os.environ,
        # The repository for the app module; `celery_fleet` then comes from the single file the
        # elector appends, as in a pod (it shadows the development install).
        "PYTHONPATH": str(ROOT),
        "SLOTS_BROKER_URL": broker_url,
        "SLOTS_QUEUE": queue,
        "SLOTS_SENDER": identity,
        **(extra_env or {}),
    }
    env.pop("KUBECONFIG", None)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
    return BeatElector(identity, proc, log_path)


def start_app_elector(
    identity: str,
    *,
    workdir: Path,
    kubeconfig: Path,
    namespace: str,
    lease: str,
    timings: Timings,
    app: str,
    scheduler: str,
    env: dict[str, str],
) -> BeatElector:
    """`celery -A app beat --scheduler scheduler` under the elector, without --schedule-state: a
    scheduler that keeps its own state (django-celery-beat, redbeat)."""
    elector = standalone_elector(workdir)
    log_path = workdir / f"{identity}.log"
    argv = [
        sys.executable, str(elector),
        *admin_connection(kubeconfig, None),
        "--namespace", namespace, "--lease", lease, "--identity", identity, *timings.flags(),
        "--",
        sys.executable, "-m", "celery", "-A", app, "beat", "--loglevel", "INFO", "--scheduler", scheduler,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("KUBECONFIG", None)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(workdir))
    return BeatElector(identity, proc, log_path)
