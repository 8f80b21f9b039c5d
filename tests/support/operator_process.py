"""The real operator (`celery-fleet run`) as a subprocess, its output captured for assertions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.redis_server import free_port
from tests.support.wait import wait_for

# The tests' brokers listen on loopback, which the operator refuses by default (a tenant's
# `redis://:6379` would be the operator's own loopback): the test operator allows it explicitly.
ALLOW_LOOPBACK = ("--broker-allow", "127.0.0.0/8", "--broker-allow", "::1/128")


class OperatorProcess:
    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        log_path: Path,
        *extra: str,
        command: list[str] | None = None,
        allow_loopback: bool = True,
    ) -> None:
        # `command` runs `celery-fleet` some other way (the built image, in tests/integration/test_image.py).
        self.command = command or [sys.executable, "-m", "celery_fleet.cli"]
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log_path
        self.extra = [*(ALLOW_LOOPBACK if allow_loopback else ()), *extra]
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        args = [*self.command, "run", "--kubeconfig", str(self.kubeconfig)]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += [
            "--metrics-port", str(self.metrics_port), "--metrics-addr", "127.0.0.1",
            "--health-endpoint", f"http://127.0.0.1:{self.health_port}/healthz",
            *self.extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._healthy, timeout=60, message=lambda: f"operator health endpoint; log:\n{self.logs()[-3000:]}")

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return bool(r.status == 200)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str) -> float:
        """Sum of a metric's samples over all its label sets."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics().splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
