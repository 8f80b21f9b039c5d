"""The Go-built tools the tests judge with (helm, kstatus, kubeconform, kube-score), from the cache.

`hack/build-binaries.sh <tool>` is a no-op when the cached binary matches its recipe (versions.env,
and for kstatus its source); it rebuilds a stale one. `make test` builds them all up front.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@cache
def tool(name: str) -> Path:
    proc = subprocess.run(
        [str(ROOT / "hack" / "build-binaries.sh"), name], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/build-binaries.sh {name} failed:\n{proc.stderr[-3000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1]) / name
    if not path.is_file():
        pytest.fail(f"hack/build-binaries.sh {name} did not produce {path}")
    return path
