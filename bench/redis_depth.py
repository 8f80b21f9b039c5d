"""Benchmark the Redis depth reader: commands and round trips per poll, poll latency, in-flight cost.

Starts its own redis-server on a free loopback port, then measures

1. polls of 1, 10 and 100 pools x 3 tiers on one broker through one shared BrokerPoller:
   round trips per poll (counted at the client), Redis commands per poll (`INFO commandstats`
   deltas, which include the commands the Lua script runs) and poll latency p50/p99;
2. the in-flight count against `unacked` hashes of 0, 1k, 10k and 100k entries holding real
   Celery message payloads: poll latency, the script's server-side time (the time Redis is busy),
   with the default scan limit and without one, next to the naive HGETALL alternative.

Writes bench/results/redis_depth.md (with the command that produced it). Run: `make bench` or
`.venv/bin/python bench/redis_depth.py [--polls N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from celery_fleet.brokers import BrokerPoller, queue_refs
from celery_fleet.brokers.redis.connection import connect
from celery_fleet.brokers.redis.scripts import DEFAULT_SCAN_LIMIT, Command, Reply
from celery_fleet.brokers.redis.source import RedisDepthSource
from celery_fleet.brokers.redis.target import RedisTarget
from celery_fleet.brokers.source import KeyLayout
from celery_fleet.planning.scaling import Observation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "redis_depth.md"
TIERS = ("high", "medium", "low")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found: run `make install-system`")
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = redis.Redis(port=self.port, socket_timeout=60)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.version = str(self.client.info("server")["redis_version"])

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def commandstats(self) -> dict[str, tuple[int, int]]:
        stats = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


@dataclass(frozen=True)
class PoolRow:
    pools: int
    queues: int
    round_trips: float
    per_command: dict[str, float]
    eval_usec: float
    p50: float
    p99: float

    @property
    def commands(self) -> float:
        return sum(self.per_command.values())


@dataclass(frozen=True)
class UnackedRow:
    size: int
    scan_limit: int
    p50: float
    p99: float
    eval_usec: float
    in_flight: int
    exact: bool


@dataclass(frozen=True)
class HgetallRow:
    size: int
    p50: float
    nbytes: int


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


BUDGET = 0.02  # RedisDepthSource's default inflight_budget


def walk_every(eval_usec: float) -> str:
    interval = max(1.0, eval_usec / 1e6 / BUDGET)
    return "every poll" if interval <= 1.0 else f"every {interval:.1f} s"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def counting_connect(url: str, scan_limit: int = DEFAULT_SCAN_LIMIT) -> tuple[RedisDepthSource, list[int]]:
    real = connect(url, scan_limit=scan_limit, read_timeout=30)
    calls = [0]

    async def round_trip(commands: Sequence[Command]) -> list[Reply]:
        calls[0] += 1
        return await real._round_trip(commands)

    # inflight_budget=0: walk `unacked` on every poll, so each poll shows the walk's full cost.
    source = RedisDepthSource(
        round_trip, RedisTarget.parse(url), scan_limit=scan_limit, inflight_budget=0, deadline_seconds=60,
        close=real.aclose,
    )  # fmt: skip
    return source, calls


# -- 1. pools x tiers on one broker -----------------------------------------------------------------------


async def bench_pools(server: Server, pools: int, polls: int) -> PoolRow:
    server.client.flushall()
    refs_by_pool = {f"ns/pool-{i}": queue_refs([f"pool{i}-{t}" for t in TIERS]) for i in range(pools)}
    pipe = server.client.pipeline(transaction=False)
    for refs in refs_by_pool.values():  # a few messages in some priority lists; LLEN is O(1) anyway
        pipe.lpush(refs[0].name, b"x")
        pipe.lpush(refs[0].name + "\x06\x163", b"x")
    pipe.execute()

    source, calls = counting_connect(server.url)
    poller = BrokerPoller(source, max_age=0.0)
    for owner, refs in refs_by_pool.items():
        poller.want(owner, refs)
    owner, refs = next(iter(refs_by_pool.items()))
    await poller.read(owner, refs)  # connect outside the measurement
    calls[0] = 0
    server.client.config_resetstat()
    latencies = []
    for _ in range(polls):
        started = time.perf_counter()
        await poller.read(owner, refs)
        latencies.append(time.perf_counter() - started)
    stats = server.commandstats()
    await poller.aclose()
    per_poll = {k: calls_ / polls for k, (calls_, _) in stats.items() if k not in ("config|resetstat", "info")}
    eval_calls, eval_usec = stats.get("eval_ro", (0, 0))
    return PoolRow(
        pools, pools * len(TIERS), calls[0] / polls, per_poll, eval_usec / max(1, eval_calls), pct(latencies, 50),
        pct(latencies, 99),
    )  # fmt: skip


# -- 2. in-flight cost vs unacked size ----------------------------------------------------------------------


def real_celery_payload(server: Server) -> bytes:
    """One message exactly as Celery puts it on the list (then kombu wraps it into `unacked`)."""
    from celery import Celery

    app = Celery("bench", broker=server.url)
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    app.send_task("proj.tasks.resize_image", args=["s3://bucket/images/0001.png", 1024, 768], queue="pool0-high")
    app.close()
    raw = server.client.rpop("pool0-high")
    assert raw is not None
    return bytes(raw)


def fill_unacked(server: Server, start: int, stop: int, payload: bytes) -> None:
    message = json.loads(payload)
    queues = [f"pool0-{t}" for t in TIERS]
    pipe = server.client.pipeline(transaction=False)
    for q in queues:  # Celery declares each queue's binding: direct exchange named after it
        pipe.sadd(f"_kombu.binding.{q}", f"{q}\x06\x16\x06\x16{q}")
    for i in range(start, stop):
        q = queues[i % 3]
        pipe.hset("unacked", f"tag-{i:08d}", json.dumps([message, q, q]))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


async def bench_unacked(server: Server, size: int, polls: int, payload: bytes, scan_limit: int) -> UnackedRow:
    refs = queue_refs([f"pool0-{t}" for t in TIERS])
    source, _ = counting_connect(server.url, scan_limit=scan_limit)
    reading = await source.read(refs)
    server.client.config_resetstat()
    latencies = []
    for _ in range(polls):
        started = time.perf_counter()
        reading = await source.read(refs)
        latencies.append(time.perf_counter() - started)
    stats = server.commandstats()
    await source.aclose()
    calls, usec = stats.get("eval_ro", (0, 0))
    observed = reading.observe(refs)
    assert isinstance(observed, Observation), observed
    return UnackedRow(
        size, scan_limit, pct(latencies, 50), pct(latencies, 99), usec / max(1, calls), observed.in_flight,
        reading.unacked[KeyLayout()].exact,
    )  # fmt: skip


def bench_hgetall(server: Server, size: int, repeats: int) -> HgetallRow:
    latencies, nbytes = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        values = server.client.hgetall("unacked")
        latencies.append(time.perf_counter() - started)
        nbytes = sum(len(k) + len(v) for k, v in values.items())
    return HgetallRow(size, pct(latencies, 50), nbytes)


# -- report ---------------------------------------------------------------------------------------------


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=200, help="polls per pool-count measurement")
    parser.add_argument("--unacked-polls", type=int, default=20, help="polls per unacked-size measurement")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    started = time.monotonic()
    server = Server()
    try:
        pool_rows = [await bench_pools(server, n, args.polls) for n in (1, 10, 100)]
        server.client.flushall()
        payload = real_celery_payload(server)
        unacked_rows: list[UnackedRow] = []
        hgetall_rows: list[HgetallRow] = []
        filled = 0
        for size in (0, 1_000, 10_000, 100_000):
            fill_unacked(server, filled, size, payload)
            filled = size
            assert server.client.hlen("unacked") == size
            for limit in (DEFAULT_SCAN_LIMIT, 10**9):
                if limit != DEFAULT_SCAN_LIMIT and size <= DEFAULT_SCAN_LIMIT:
                    continue  # same as the default limit
                polls = args.unacked_polls if size < 100_000 else max(3, args.unacked_polls // 4)
                unacked_rows.append(await bench_unacked(server, size, polls, payload, limit))
            hgetall_rows.append(bench_hgetall(server, size, 3 if size < 100_000 else 1))
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    command = "python bench/redis_depth.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])
    )
    lines = [
        "# Redis depth reader: cost per poll",
        "",
        f"Produced by `{command}` (also run by `make bench`) in {elapsed:.0f} s on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, redis-server {server.version} on loopback, "
        f"redis-py {redis.__version__} (asyncio). Latency is client-side wall time of one `source.read()`, "
        "including building the pipeline and parsing the replies.",
        "",
        "## Pools x 3 tiers on one broker (one shared BrokerPoller)",
        "",
        "Each tier has one queue with the default priority steps [0, 3, 6, 9]. Commands per poll come from "
        "`INFO commandstats` deltas over the polls (they include the commands the in-flight script runs "
        "inside Redis); round trips are counted at the client.",
        "",
        "| pools | queues | round trips / poll | Redis commands / poll | EVAL_RO (sent) | LLEN (in EVAL_RO) "
        "| HLEN+HSCAN+SCARD+SMEMBERS (in EVAL) | EVAL µs (server) | poll p50 ms | poll p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pool_rows:
        per = r.per_command
        inside = sum(per.get(c, 0) for c in ("hlen", "hscan", "scard", "smembers"))
        lines.append(
            f"| {r.pools} | {r.queues} | {r.round_trips:.0f} | {r.commands:.0f} | {per.get('eval_ro', 0):.0f} "
            f"| {per.get('llen', 0):.0f} | {inside:.0f} | {r.eval_usec:,.0f} | {ms(r.p50)} | {ms(r.p99)} |"
        )
    lines += [
        "",
        "## In-flight counting vs size of the `unacked` hash",
        "",
        f"Entries are real Celery messages ({len(payload)} bytes of JSON each, as `send_task` produced it) "
        "wrapped as kombu does: `[payload, exchange, routing_key]`, spread over 3 queues; one poll = 1 EVAL "
        "(12 LLEN + the walk), measured with the walk forced on every poll. "
        "`EVAL µs` is the server-side time per call from commandstats: Redis runs nothing else meanwhile. "
        f"The default scan limit is {DEFAULT_SCAN_LIMIT:,} entries; above it the counts are extrapolated "
        "from the sample and flagged approximate. By default the walk is also held to 2% of Redis' time "
        "(`inflight_budget`): the last two columns show what that means at a 1 s poll interval; polls between "
        "walks still read every queue length and reuse the last in-flight counts.",
        "",
        "| unacked entries | scan limit | poll p50 ms | poll p99 ms | EVAL µs (server) | in-flight read | exact "
        "| walks at 1 poll/s with the 2% budget | Redis busy walking |",
        "|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for u in unacked_rows:
        shown = "none" if u.scan_limit == 10**9 else f"{u.scan_limit:,}"
        lines.append(
            f"| {u.size:,} | {shown} | {ms(u.p50)} | {ms(u.p99)} | {u.eval_usec:,.0f} "
            f"| {u.in_flight:,} | {'yes' if u.exact else 'approx.'} | {walk_every(u.eval_usec)} "
            f"| {min(u.eval_usec / 1e6, BUDGET) * 100:.1f}% |"
        )
    lines += [
        "",
        "For comparison, the naive alternative: `HGETALL unacked` and parsing in the operator "
        "(every payload crosses the network on every poll):",
        "",
        "| unacked entries | HGETALL p50 ms | bytes transferred |",
        "|---:|---:|---:|",
    ]
    for h in hgetall_rows:
        lines.append(f"| {h.size:,} | {ms(h.p50)} | {h.nbytes:,} |")
    lines += [
        "",
        "Reading: a poll is one round trip and one command whatever the number of pools; its cost grows with "
        "the number of priority lists (4 LLEN per queue, each O(1), run inside the script) and with the size of "
        "`unacked`, which is bounded by workers x concurrency x prefetch multiplier (+ running tasks with "
        "late ack): the default tiers at their maximum hold 8x4 + 12x6 + 4x2 = 112 entries per pool.",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
