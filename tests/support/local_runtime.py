"""`python -m celery_fleet_localrun` for one namespace (real worker processes), its log kept for assertions."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.cluster import ROOT, Cluster


class LocalRuntime:
    def __init__(self, cluster: Cluster, namespace: str, state_dir: Path, pythonpath: Path = ROOT / "demo") -> None:
        self.log_path = state_dir / "localrun.log"
        args = [
            sys.executable, "-m", "celery_fleet_localrun", "--namespace", namespace,
            "--kubeconfig", str(cluster.kubeconfig), "--state-dir", str(state_dir),
            "--pythonpath", str(pythonpath), "--interval", "0.25", "--shutdown-timeout", "20",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
