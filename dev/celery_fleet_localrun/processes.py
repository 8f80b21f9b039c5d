"""Local processes standing in for containers: started in their own session, logged to a file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from celery_fleet_localrun.container import ProcessSpec

PR_SET_PDEATHSIG = 1


def _die_with_runtime(parent: int) -> Callable[[], None]:
    """If the runtime dies without stopping its processes (SIGKILL, a crash), Linux sends them
    SIGTERM, so they shut down warm instead of lingering as orphans."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def hook() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runtime died before prctl took effect
            os._exit(1)

    return hook


class Process:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self._popen.poll()

    def terminate(self) -> None:
        # Only the main process, as the kubelet signals only PID 1: Celery's main process
        # coordinates the warm shutdown of its pool.
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()


class SubprocessLauncher:
    """Starts each container's process in a new session (its own process group), so SIGKILL
    reaches every process of the container and a Ctrl-C in the terminal reaches only the runtime.
    Single-threaded use only: the pre-exec hook must not run while another thread holds a lock."""

    def start(self, spec: ProcessSpec, log_path: Path) -> Process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.cwd.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # The command name only: arguments may carry what must not land in a log.
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {spec.argv[0]}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                list(spec.argv),
                env=dict(spec.env),
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_runtime(os.getpid()),
            )
        return Process(popen)
