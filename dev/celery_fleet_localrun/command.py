"""`celery-fleet localrun`: the local runtime's command line and its loop."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from celery_fleet.kube.client import load_api_client
from celery_fleet_localrun import procfs
from celery_fleet_localrun.cluster import MANAGED_SELECTOR, RUN_LABEL, RUN_LABEL_VALUE, LocalCluster
from celery_fleet_localrun.preparer import LocalPreparer, default_image_files
from celery_fleet_localrun.processes import SubprocessLauncher
from celery_fleet_localrun.status import status_patch, stopped_patch
from celery_fleet_localrun.supervisor import Backoff, Supervisor

log = logging.getLogger("celery_fleet_localrun")

DESCRIPTION = f"""\
A local runtime for development and tests only. For the pods of celery-fleet's Deployments in a
local cluster whose nodes are fake (kwok) that carry the label {RUN_LABEL}={RUN_LABEL_VALUE} (a pool's
or beat's podLabels), it runs each container as a process on this machine, from the pod's command,
args and env; SIGTERMs them when their pod goes away; restarts them when they die; and reports their
real readiness in the pods' status (the local cluster's kwok leaves readiness of these pods to it).
Never point it at a real cluster.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-fleet localrun", description=DESCRIPTION)
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="run pods of NS (a name or glob; repeatable)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="run pods of every namespace")
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="admin kubeconfig of the local cluster"
    )
    parser.add_argument("--selector", default=MANAGED_SELECTOR, help=f"pod label selector (default {MANAGED_SELECTOR})")
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".local/localrun"), help="pod directories and container logs"
    )
    parser.add_argument(
        "--pythonpath", action="append", default=[], metavar="DIR",
        help="put DIR on the processes' PYTHONPATH: the application an image would carry (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--image-file", action="append", default=[], metavar="IMAGE_PATH=LOCAL_PATH",
        help="map a file of the image to a local one (default: the operator image's elector -> this checkout's)",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between syncs with the apiserver")
    parser.add_argument("--restart-backoff", type=float, default=1.0, help="first restart delay, doubling per crash")
    parser.add_argument("--restart-backoff-max", type=float, default=30.0, help="longest restart delay")
    parser.add_argument(
        "--shutdown-timeout", type=float, default=60.0,
        help="on exit, longest wait for warm shutdowns before SIGKILL (each pod's grace period applies first)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def base_env(pythonpath: Sequence[str]) -> dict[str, str]:
    """What an image would set: this interpreter's bin directory first on PATH (python3, celery)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "/usr/bin:/bin")]),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
    }
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in pythonpath)
    return env


def image_files(mappings: Sequence[str]) -> dict[str, Path]:
    files = default_image_files()
    for mapping in mappings:
        image_path, sep, local = mapping.partition("=")
        if not sep or not image_path.startswith("/") or not local:
            raise SystemExit(f"--image-file {mapping!r}: expected /path/in/image=local/path")
        files[image_path] = Path(local).resolve()
    return files


class Stop:
    def __init__(self) -> None:
        self.requested = 0

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.requested += 1
        log.info("received %s", signal.Signals(signum).name)


def _wait(seconds: float, stop: Stop) -> None:
    deadline = time.monotonic() + seconds
    seen = stop.requested
    while stop.requested == seen and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.05, left))


class LocalRuntime:
    def __init__(self, cluster: LocalCluster, preparer: LocalPreparer, supervisor: Supervisor) -> None:
        self.cluster = cluster
        self.preparer = preparer
        self.supervisor = supervisor
        self.reported: set[str] = set()

    def sync(self) -> None:
        try:
            pods = self.cluster.pods()
        except Exception as exc:  # any apiserver trouble: keep running what runs
            log.warning("cannot list pods (processes keep running): %s", exc)
        else:
            self.supervisor.sync(pods)
        self.supervisor.step()
        self.report()
        self.preparer.refresh_tokens()

    def report(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.reported &= set(self.supervisor.pods)
        for view in self.supervisor.views():
            local = self.supervisor.pods.get(view.uid)
            if local is None:
                continue
            pod = local.pod
            # kwok first makes the pod Running; a status written before that would be overwritten.
            if (pod.get("status") or {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
                continue
            patch = status_patch(pod, view, now)
            if patch is None:
                continue
            try:
                updated = self.cluster.patch_pod_status(view.namespace, view.name, patch)
            except Exception as exc:  # best effort: the next tick tries again
                log.warning("pod %s/%s: cannot report status: %s", view.namespace, view.name, exc)
                continue
            if updated is not None:
                local.pod = updated
                self.reported.add(view.uid)

    def shutdown(self, timeout: float, stop: Stop) -> None:
        """Warm-stop every process (SIGTERM, then SIGKILL after its grace period or `timeout`)."""
        pods = {uid: p.pod for uid, p in self.supervisor.pods.items() if uid in self.reported}
        self.supervisor.terminate_all()
        deadline = time.monotonic() + timeout
        forced = stop.requested
        while not self.supervisor.idle:
            self.supervisor.step()
            if time.monotonic() >= deadline or stop.requested > forced:
                log.warning("shutdown: SIGKILL to what is left")
                for local in self.supervisor.pods.values():
                    for run in local.runs():
                        if run.process is not None:
                            run.process.kill()
                forced = stop.requested
                deadline = float("inf")
            time.sleep(0.05)
        now = dt.datetime.now(dt.UTC)
        for pod in pods.values():
            meta = pod["metadata"]
            try:
                self.cluster.patch_pod_status(meta["namespace"], meta["name"], stopped_patch(now))
            except Exception:  # the cluster may be gone already; the pods then go with it
                continue


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s localrun: %(message)s", stream=sys.stderr
    )
    api = load_api_client(args.kubeconfig)
    cluster = LocalCluster(api, [] if args.all_namespaces else args.namespace, args.selector)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    preparer = LocalPreparer(cluster, state_dir, base_env(args.pythonpath), image_files(args.image_file))
    supervisor = Supervisor(
        SubprocessLauncher(),
        preparer,
        procfs.connected_to_port,
        clock=time.monotonic,
        backoff=Backoff(initial=args.restart_backoff, maximum=args.restart_backoff_max),
    )
    runtime = LocalRuntime(cluster, preparer, supervisor)
    stop = Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scope = "every namespace" if args.all_namespaces else ", ".join(args.namespace)
    log.info("local runtime (development only) for pods in %s; logs in %s", scope, state_dir / "logs")
    while not stop.requested:
        started = time.monotonic()
        runtime.sync()
        _wait(max(0.0, args.interval - (time.monotonic() - started)), stop)
    log.info("stopping %d pod(s)", len(supervisor.pods))
    runtime.shutdown(args.shutdown_timeout, stop)
    api.close()
    return 0
