"""The local control plane (hack/cluster.sh) as seen by tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc


def ensure_cluster() -> Cluster:
    """Reuse a running local cluster, or start one (kept running for the next test run)."""
    subprocess.run([str(ROOT / "hack" / "cluster.sh"), "up"], check=True, timeout=3600)
    return Cluster(kubeconfig=ROOT / ".local" / "kubeconfig", bin_dir=ROOT / ".local" / "bin")
