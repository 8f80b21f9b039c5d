"""A local runtime for development and tests only: real processes for the pods of a kwok cluster.

kwok's fake kubelets mark pods Running without running anything. This package plays the kubelet
for the pods of celery-fleet's Deployments in such a local cluster: one local process per
container, started from the pod's command, args and env; SIGTERM (a Celery warm shutdown) when
the pod goes away and SIGKILL after its grace period; restarts with back-off; real readiness
written back to the pod's status. `make demo` and the closed-loop tests use it.

It is not part of the operator and does not ship: it lives outside the package (dev/), so the
wheel and the image lack it; `make install` puts dev/ on the virtualenv's path. Nothing in
celery_fleet imports it except the `celery-fleet localrun` command (an import contract).
Entry point: :func:`main` (also `python -m celery_fleet_localrun`).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from celery_fleet_localrun.command import main as run

    return run(argv)


__all__ = ["main"]
