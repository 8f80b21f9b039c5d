"""PNG plots of one run per autoscaler: queue depth and replicas over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine

import matplotlib.pyplot as plt  # the backend must be chosen before pyplot loads

from .engine import SimResult

__all__ = ["plot_trace"]

COLORS = {"celery-fleet": "tab:blue", "KEDA+HPA": "tab:red", "static max": "tab:gray"}


def plot_trace(
    results: Sequence[SimResult], title: str, path: Path, *, subtitle: str = "", until: float | None = None
) -> None:
    """Two panels sharing time: queued messages (all sub-lists; dashed: the bare list alone) and
    replicas (solid: spec.replicas; dotted: pods that cost, starting and draining ones included)."""
    fig, (depth, replicas) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, constrained_layout=True)
    for r in results:
        s = r.samples
        color = COLORS.get(r.scaler)
        depth.plot(s.t, s.queued, color=color, lw=1.4, label=f"{r.scaler}: queued (all priority lists)")
        if r.scaler == "KEDA+HPA" and any(a != b for a, b in zip(s.queued, s.queued_bare, strict=True)):
            depth.plot(s.t, s.queued_bare, color=color, lw=1.0, ls="--", label=f"{r.scaler}: LLEN of the bare list")
        replicas.plot(s.t, s.spec_replicas, color=color, lw=1.6, drawstyle="steps-post", label=f"{r.scaler}: spec")
        replicas.plot(s.t, s.pods, color=color, lw=1.0, ls=":", drawstyle="steps-post", label=f"{r.scaler}: pods")
    depth.set_ylabel("queued messages")
    depth.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=10)
    depth.legend(fontsize=8, loc="upper right")
    depth.grid(alpha=0.3)
    replicas.set_ylabel("replicas")
    replicas.set_xlabel("time (s)")
    replicas.legend(fontsize=8, loc="upper right", ncol=2)
    replicas.grid(alpha=0.3)
    if until is not None:
        replicas.set_xlim(0, until)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
