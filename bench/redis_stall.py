"""Benchmark: how long another client of the user's Redis waits while the operator polls (issue 24).

Starts its own redis-server, fills kombu's `unacked` hash and `unacked_index` zset with Celery-shaped
entries (`[payload, exchange, routing_key]`) at three sizes, and while the operator polls, one
client sends PING every 10 ms and records each reply's latency (its stall).

- before: main's poll script (as of commit BASELINE): one EVAL that HSCANs `unacked`, copying every
  value into Lua, up to 5,000 entries. Sent as main's poll sent it, over the operator's own round
  trip; an EVAL over the operator's 2 s read timeout is what main reported as an unreachable broker.
- after: the operator's real poll path (`connect` -> `BrokerPoller.read`), polled every 0.5 s: the
  walk is bounded in bytes and Redis time per EVAL and resumes where it stopped; every poll error is
  counted by kind (OwnPollSlow / Timeout / Unreachable).

Writes bench/results/redis_stall.md with its command. Run: `make bench` or
`.venv/bin/python bench/redis_stall.py [--polls N] [--sizes 100000x1024,...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis
from _harness import ROOT, RedisServer, write_result

from celery_fleet.brokers import BrokerError, BrokerPoller, queue_refs
from celery_fleet.brokers.redis.connection import connect
from celery_fleet.brokers.redis.scripts import BOUNDS, DEFAULT_SCAN_LIMIT, WALK_BUDGET

BASELINE = "a2d4de0"  # main before issue 24's bounded walk
SIZES = ((100_000, 1024), (20_000, 20 * 1024), (5_000, 100 * 1024))
READ_TIMEOUT = 2.0  # connect()'s default socket read timeout: past it, main's poll failed


def old_script() -> str:
    text = subprocess.run(
        ["git", "show", f"{BASELINE}:operator/celery_fleet/brokers/redis/scripts.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    scope: dict[str, object] = {}
    exec(compile(text, "scripts_before.py", "exec"), scope)  # our own file at a pinned commit
    return str(scope["POLL_SCRIPT"])


def fill(client: redis.Redis, n: int, value_bytes: int) -> None:
    client.flushall()
    body = json.dumps({"args": ["x" * max(0, value_bytes - 300)], "kwargs": {}})
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        tag = f"{i:08d}-0000-4000-8000-000000000000"
        pipe.hset("unacked", tag, json.dumps([body, "", "celery"]))
        pipe.zadd("unacked_index", {tag: now})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    client.rpush("celery", "m")


class Prober:
    """One client sending PING every 10 ms; each reply's latency is a stall sample (ms)."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port, socket_timeout=60)
        self.samples: list[float] = []
        self.busy = 0  # PINGs Redis answered with BUSY (a script past busy-reply-threshold)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                self.client.ping()
            except redis.ResponseError as err:
                if not str(err).startswith("BUSY"):
                    raise
                self.busy += 1
            self.samples.append((time.perf_counter() - t) * 1000)
            self._stop.wait(0.010)

    def __enter__(self) -> Prober:
        self._thread.start()
        while len(self.samples) < 5:  # connected and pinging before the leg starts
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def summary(self) -> tuple[float, float, int]:
        s = sorted(self.samples)
        return s[int(0.99 * (len(s) - 1))], s[-1], len(s)


def eval_stats(client: redis.Redis) -> tuple[int, float]:
    stats = client.info("commandstats").get("cmdstat_eval_ro", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


async def before(url: str, script: str, polls: int) -> tuple[list[float], int]:
    source = connect(url, read_timeout=600)  # let main's EVAL finish, to time it
    command = ("EVAL_RO", script, 3, "celery", "unacked", "unacked_index", DEFAULT_SCAN_LIMIT, "_kombu.binding.",
               BOUNDS.max_routes, BOUNDS.max_exchanges, BOUNDS.max_bindings, BOUNDS.max_member_bytes,
               BOUNDS.max_name_bytes, 3600)  # fmt: skip
    took: list[float] = []
    try:
        for _ in range(polls):
            t = time.perf_counter()
            (reply,) = await source._round_trip([command])
            took.append(time.perf_counter() - t)
            assert not isinstance(reply, BaseException), reply
    finally:
        await source.aclose()
    return took, sum(1 for t in took if t > READ_TIMEOUT)


async def after(url: str, polls: int) -> tuple[list[float], Counter[str], int, str]:
    """Polls 0.5 s apart until one whole walk of `unacked` ended (at most `polls`)."""
    poller = BrokerPoller(connect(url), max_age=0.0)
    refs = queue_refs(["celery"])
    took: list[float] = []
    errors: Counter[str] = Counter()
    walks_done, last = 0, ""
    try:
        for _ in range(polls):
            t = time.perf_counter()
            try:
                reading = await poller.read("bench", refs)
                s = next(iter(reading.unacked.values()))
                if s.age_seconds == 0 and s.next_rank == 0:
                    walks_done += 1
                exact = "exact" if s.exact else "scaled up"
                last = (f"{reading.in_flight.get((refs[0].layout, 'celery'), 0):,} ({exact}; walked {s.scanned:,}"
                        f" of {s.size:,}, too large {s.too_large})")  # fmt: skip
            except BrokerError as err:
                errors[err.kind.value] += 1
            took.append(time.perf_counter() - t)
            if walks_done:
                break
            await asyncio.sleep(0.5)  # the operator's poll interval
    finally:
        await poller.aclose()
    return took, errors, walks_done, last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--polls", type=int, default=3, help="polls per size before (each can take seconds)")
    parser.add_argument("--after-polls", type=int, default=160, help="at most, per size after (0.5 s apart)")
    parser.add_argument("--sizes", default=",".join(f"{n}x{b}" for n, b in SIZES))
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    script = old_script()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-stall-")))
    server.start()
    client = server.client()
    client.connection_pool.connection_kwargs["socket_timeout"] = 600
    rows = []
    try:
        version = client.info("server")["redis_version"]
        for n, value_bytes in sizes:
            fill(client, n, value_bytes)
            for leg in ("idle", "before", "after"):
                calls0, usec0 = eval_stats(client)
                client.config_set("slowlog-log-slower-than", 0)  # every command's Redis time
                client.config_set("slowlog-max-len", 100_000)
                client.slowlog_reset()
                with Prober(server.port) as probe:
                    if leg == "idle":  # nobody polls: the machine's own noise floor
                        time.sleep(10.0)
                        took, errors, note = [0.0], "-", ""
                    elif leg == "before":
                        took, over = asyncio.run(before(server.url, script, args.polls))
                        errors = f"{over} of {len(took)} polls over the {READ_TIMEOUT:.0f} s read timeout (Timeout)"
                        note = ""
                    else:
                        took, kinds, walks, note = asyncio.run(after(server.url, args.after_polls))
                        errors = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
                        note = f"{note}; whole walk: {'yes' if walks else 'not yet'}"
                calls1, usec1 = eval_stats(client)
                slow = [e["duration"] for e in client.slowlog_get(100_000) if e["command"].startswith(b"EVAL")]
                worst_eval = max(slow, default=0) / 1000
                p99, worst, samples = probe.summary()
                if probe.busy:
                    errors += f"; the probe got BUSY {probe.busy} times"
                evals = max(1, calls1 - calls0)
                rows.append(
                    f"| {n:,} x {value_bytes // 1024} KB | {leg} | {len(took)} | {p99:.1f} | {worst:.1f} | {samples} |"
                    f" {(usec1 - usec0) / evals / 1000:.1f} | {worst_eval:.1f} | {statistics.median(took) * 1000:.0f} |"
                    f" {errors} | {note} |"
                )  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        client.close()
        server.stop()
    budget = WALK_BUDGET
    body = "\n".join([
        f"Redis {version}, loopback. `unacked` filled with Celery-shaped entries of the given size (all routed to"
        " queue `celery`), `unacked_index` beside it. One client sends PING every 10 ms throughout each leg;"
        " its reply latency is the stall another client of the user's Redis sees.",
        "",
        "- idle: nobody polls for 10 s: the PING latency of this (shared, loaded) machine by itself.",
        f"- before: main's poll script (commit `{BASELINE}`): HSCAN copying every value into Lua, limit"
        f" {DEFAULT_SCAN_LIMIT:,} entries per EVAL, sent {args.polls} times over the operator's round trip.",
        "- after: the operator's poll path (`connect` -> `BrokerPoller.read`), polls 0.5 s apart until one whole walk"
        f" of `unacked` ended (at most {args.after_polls}); walks are paced to 2 % of Redis time, the polls between"
        " them read lengths only;"
        f" walk budget per EVAL: values over {budget.max_value_bytes // 1024} KiB sized not read,"
        f" {budget.max_bytes // (1024 * 1024)} MiB read, {budget.max_micros / 1000:.0f} ms of Redis time"
        f" (TIME every {budget.check_every} entries); the next walk goes on from where one stopped.",
        "",
        "| unacked | leg | polls | PING p99 ms | PING max ms | PINGs | Redis ms per EVAL (mean) | longest EVAL ms |"
        " poll ms (median) | errors | in flight (`celery`) at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Target: max stall <= 50 ms at every size, and no poll failing because of our own script. \"longest EVAL\""
        " is Redis' own SLOWLOG time of the slowest poll script in the leg.",
    ])  # fmt: skip
    write_result("redis_stall", "Redis stall while the operator polls `unacked` (issue 24)", body)


if __name__ == "__main__":
    main()
