"""The operator with a memory hook, for `fleet_scale.py --memory-profile` (a bench-only hook).

Each SIGUSR1 writes `$FLEET_TRACE_OUT-<n>.json`: the deep size of each long-lived structure
(the watch cache, the autoscaler's per-pool state, the metric series, the work queues, Kopf's
per-object memories), walked in that order so a shared object counts once, for the first owner;
the rest of RSS is the interpreter, the imported modules and the allocator's free space. Walking
costs a few seconds of one core at 1000 pools and nothing until it is asked for, so a profiled run
keeps its timings. With FLEET_TRACE_MALLOC=1, tracemalloc also runs from the start (allocations by
the innermost frame in our package, else Kopf, else the library): that one slows the operator
several times, so its timings mean nothing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
import tracemalloc
import types
from collections import defaultdict
from types import FrameType
from typing import Any

TRACING = os.environ.get("FLEET_TRACE_MALLOC") == "1"
if TRACING:
    tracemalloc.start(12)
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
    return names[0] if names else "?"


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.CodeType,
           types.FrameType, asyncio.AbstractEventLoop, asyncio.Task, asyncio.Future, logging.Logger,
           threading.Thread)  # fmt: skip


def deep_size(root: Any, seen: set[int], stop: tuple[type, ...]) -> int:
    """Bytes reachable from `root` not yet in `seen`, not entering code, classes, loops, tasks or `stop`."""
    size, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or (obj is not root and isinstance(obj, _OPAQUE + stop)):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return size


def sizes() -> dict[str, int]:
    from kopf._core.reactor.inventory import ResourceMemories

    from celery_fleet import metrics
    from celery_fleet.handlers.autoscaler.loop import Autoscaler
    from celery_fleet.handlers.cache import FleetCache
    from celery_fleet.handlers.fleet import Fleet
    from celery_fleet.kube.client import Kube

    objs = gc.get_objects()
    fleet = next(o for o in objs if isinstance(o, Fleet))
    stop = (Fleet, FleetCache, Autoscaler, Kube)
    seen: set[int] = set()
    out: dict[str, int] = {}
    cache = fleet.cache
    out["watch cache: pools"] = deep_size(cache.pools, seen, stop)
    out["watch cache: children"] = deep_size(cache.children, seen, stop) + deep_size(cache.beat_children, seen, stop)
    out["per-pool runtime (cache.runtime)"] = deep_size(cache.runtime, seen, stop)
    out["autoscaler per-pool state"] = deep_size(vars(fleet.autoscaler), seen, stop)
    out["metric series"] = deep_size(metrics.REGISTRY, seen, stop)
    out["work queues"] = deep_size(fleet.pool_queue, seen, stop) + deep_size(fleet.beat_queue, seen, stop)
    out["Kopf per-object memories"] = sum(deep_size(o, seen, stop) for o in objs if isinstance(o, ResourceMemories))
    return out


def dump(_sig: int, _frame: FrameType | None) -> None:
    global _dumps
    _dumps += 1
    result: dict[str, Any] = {"sizes": sizes()}
    if TRACING:
        by_owner: dict[str, int] = defaultdict(int)
        for stat in tracemalloc.take_snapshot().statistics("traceback"):  # one row per distinct traceback
            by_owner[owner(tuple(stat.traceback))] += stat.size
        result |= {"traced": tracemalloc.get_traced_memory()[0], "overhead": tracemalloc.get_tracemalloc_memory(),
                   "by_owner": dict(by_owner)}  # fmt: skip
    out = f"{os.environ['FLEET_TRACE_OUT']}-{_dumps}.json"
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


signal.signal(signal.SIGUSR1, dump)

from celery_fleet.cli import main  # noqa: E402  (after tracemalloc.start, so imports are traced)

sys.exit(main(sys.argv[1:]))
