"""The operator under tracemalloc, for `fleet_scale.py --memory-profile` (a bench-only hook).

Tracing starts before anything is imported. Each SIGUSR1 writes `$FLEET_TRACE_OUT-<n>.json`: the
traced bytes still held, grouped by who allocated them (see `owner`). Tracing slows the operator
and adds its own memory, so a profiled run measures where memory goes, not how fast or how much.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from collections import defaultdict
from types import FrameType

tracemalloc.start(int(os.environ.get("FLEET_TRACE_FRAMES", "12")))
STDLIB = os.path.dirname(os.__file__)
_dumps = 0


def owner(frames: tuple[tracemalloc.Frame, ...]) -> str:
    """Imports; else the innermost frame in our package; else in Kopf; else the innermost library's."""
    names = [f.filename for f in reversed(frames)]  # innermost first
    if any("importlib._bootstrap" in n for n in names):
        return "imports (modules, their constants and classes)"
    for mark in ("/celery_fleet/", "/kopf/"):
        for n in names:
            if mark in n:
                return mark.strip("/") + "/" + n.split(mark, 1)[1]
    for n in names:
        if "site-packages/" in n:
            return n.split("site-packages/", 1)[1].split("/", 1)[0]
    for n in names:
        if n.startswith(STDLIB):
            return "stdlib " + os.path.relpath(n, STDLIB)
    return names[0] if names else "?"


def dump(_sig: int, _frame: FrameType | None) -> None:
    global _dumps
    _dumps += 1
    snapshot = tracemalloc.take_snapshot()
    by_owner: dict[str, int] = defaultdict(int)
    for stat in snapshot.statistics("traceback"):  # one row per distinct traceback
        by_owner[owner(tuple(stat.traceback))] += stat.size
    current, peak = tracemalloc.get_traced_memory()
    out = f"{os.environ['FLEET_TRACE_OUT']}-{_dumps}.json"
    with open(out + ".tmp", "w") as f:
        json.dump({"traced": current, "peak": peak, "overhead": tracemalloc.get_tracemalloc_memory(),
                   "by_owner": dict(by_owner)}, f)  # fmt: skip
    os.replace(out + ".tmp", out)


signal.signal(signal.SIGUSR1, dump)

from celery_fleet.cli import main  # noqa: E402  (after tracemalloc.start, so imports are traced)

sys.exit(main(sys.argv[1:]))
