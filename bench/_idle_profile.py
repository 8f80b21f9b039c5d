"""The autoscaler's idle cost per pool-poll, in-process: N idle pools x 3 tiers in the cache, one real
redis-server, `Autoscaler.tick()` repeated; CPU time per tick (and a cProfile with --profile).

A helper for fleet_scale.py's idle figure (which measures the whole operator against a cluster):
this one isolates the poll path so a change to it can be judged in seconds.
    .venv/bin/python bench/_idle_profile.py --pools 1000 --ticks 30 [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import RedisServer

from celery_fleet.handlers.autoscaler.loop import Autoscaler
from celery_fleet.handlers.cache import POOL_LABEL, FleetCache
from celery_fleet.kube.client import Kube

TIERS = ("high", "medium", "low")


class NoApi:
    def call_api(self, *_: Any, **__: Any) -> tuple[Any, int, dict[str, str]]:
        raise AssertionError("an idle fleet makes no apiserver request")


def fill(cache: FleetCache, pools: int, url: str) -> None:
    for i in range(pools):
        name, uid = f"p{i:04d}", f"uid-{i}"
        spec = {
            "app": "bench:app", "image": "img:1", "broker": {"url": url},
            "tiers": [{"name": t, "queues": [f"{name}_{t}"], "concurrency": 2, "replicas": {"min": 1, "max": 4},
                       "autoscaling": {"targetDepthPerReplica": 10}} for t in TIERS],
        }  # fmt: skip
        meta = {"name": name, "namespace": "bench", "uid": uid, "generation": 1}
        key = cache.put_pool({"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": meta,
                              "spec": spec})  # fmt: skip
        cache.runtime[key].broker_url = url
        owner = {"kind": "CeleryWorkerPool", "name": name, "uid": uid, "controller": True}
        for t in TIERS:
            dep_meta = {"name": f"{name}-{t}", "namespace": "bench", "uid": f"{uid}-{t}", "ownerReferences": [owner],
                        "labels": {POOL_LABEL: name, "celeryfleet.io/tier": t}}  # fmt: skip
            status = {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
            cache.put_child(POOL_LABEL, {"kind": "Deployment", "metadata": dep_meta, "spec": {"replicas": 1},
                                         "status": status})  # fmt: skip


async def run(pools: int, ticks: int, url: str, profile: bool, busy: int, redis: RedisServer) -> None:
    cache = FleetCache()
    fill(cache, pools, url)
    autoscaler = Autoscaler(Kube(NoApi()), cache, refresh_status=lambda key: None, interval=0.0)
    for _ in range(3):  # warm: connections, parsed specs, the first decisions
        await autoscaler.tick()
    prof = cProfile.Profile() if profile else None
    cpu0, wall0 = time.process_time(), time.monotonic()
    if prof:
        prof.enable()
    r = redis.client()
    for i in range(ticks):
        if busy:  # a few pools' queues change every poll (one message more), the rest stay idle
            with r.pipeline(transaction=False) as pipe:
                for p in range(busy):
                    pipe.lpush(f"p{p:04d}_low", b"{}") if i % 2 == 0 else pipe.rpop(f"p{p:04d}_low")
                pipe.execute()
        await autoscaler.tick()
    if prof:
        prof.disable()
    cpu = time.process_time() - cpu0
    print(f"{pools} pools ({busy} busy), {ticks} ticks: {cpu / ticks * 1e3:.1f} ms CPU per tick, "
          f"{cpu / ticks / pools * 1e6:.1f} us per pool-poll (wall {time.monotonic() - wall0:.1f} s)")  # fmt: skip
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    await autoscaler.registry.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--busy", type=int, default=0, help="pools whose low queue changes every tick")
    args = ap.parse_args()
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="idle-")) / "redis")
    redis.start()
    try:
        asyncio.run(run(args.pools, args.ticks, redis.url, args.profile, args.busy, redis))
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
