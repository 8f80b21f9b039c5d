"""Shared pieces of the benchmarks: the local cluster, a Redis, the real operator, and measurements."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster, ensure_cluster  # noqa: E402
from tests.support.operator_process import OperatorProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
__all__ = ["ROOT", "Cluster", "OperatorProcess", "RedisServer", "wait_for"]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def cluster_with_crds(nodes: int = 3) -> Cluster:
    cluster = ensure_cluster()
    for f in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
    have = len(cluster.kubectl("get", "nodes", "--no-headers").stdout.splitlines())
    if have < nodes:
        kwokctl = ROOT / ".local" / "bin" / "kwokctl"
        env = dict(os.environ, KWOK_WORKDIR=str(ROOT / ".local" / "kwok"))
        subprocess.run([str(kwokctl), "--name", "celery-fleet", "scale", "node", "--replicas", str(nodes)],
                       check=True, env=env, capture_output=True)  # fmt: skip
        wait_for(
            lambda: len(cluster.kubectl("get", "nodes", "--no-headers").stdout.splitlines()) >= nodes,
            timeout=120,
            message=f"{nodes} nodes",
        )
    return cluster


def start_operator(cluster: Cluster, namespaces: list[str], workdir: Path, *extra: str) -> OperatorProcess:
    op = OperatorProcess(cluster.kubeconfig, namespaces, workdir / "operator.log", "--log-level", "WARNING", *extra)
    op.start()
    return op


def proc_usage(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds) of a process, from /proc."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return rss_kib / 1024, cpu


def kubectl_apply_many(cluster: Cluster, namespace: str, objects: list[dict[str, Any]]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": objects}, f)
    try:
        cluster.kubectl("apply", "-n", namespace, "--server-side", "-f", f.name, timeout=600)
    finally:
        os.unlink(f.name)


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(
        f"# {title}\n\nCommand: `{command_line()}`  \nRun: {stamp} on {os.cpu_count()} cores "
        f"(`nproc`); one run, so read ratios before absolute times.\n\n{body}\n"
    )
    print(path.read_text())
    return path


def healthz(op: OperatorProcess) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=2) as r:
        return bool(r.status == 200)
