"""Hostile inputs on the poll path (issue 24), each against the operator's real poll code and a real
Redis (or a fake server for non-Redis answers), while a lag probe measures the event loop, the
process's peak RSS is taken, and a victim pool on another broker gets a burst it must see in time.

Each attack prints one line (what was tried, what the poll did, loop lag, RSS growth, the victim's
delay): the figures in bench/results/resilience.md come from `pytest -s` of this file.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from celery_fleet.brokers import BrokerError, BrokerRegistry, DepthReading, ErrorKind, queue_refs
from celery_fleet.brokers.redis.connection import connect
from celery_fleet.brokers.source import KeyLayout, UnackedSummary
from tests.support.redis_server import RedisServer

SEP = "\x06\x16"
MAX_LOOP_LAG = 0.100
VICTIM_DEADLINE = 1.5
MAX_RSS_GROWTH_MIB = 64.0
POLL_EVERY = 0.25  # how often the autoscaler asks each broker


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("victim"))
    server.start()
    yield server
    server.stop()


def rss_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field_name} in /proc/self/status")


@dataclass
class Attack:
    """What one attack showed: the worst loop lag, RSS growth, the victim's delay, the attacked polls."""

    lag: float = 0.0
    rss_growth_mib: float = 0.0
    victim_seconds: float | None = None
    readings: list[DepthReading] = field(default_factory=list)
    errors: list[BrokerError] = field(default_factory=list)

    def report(self, what: str, did: str) -> str:
        victim = f"{self.victim_seconds:.2f} s" if self.victim_seconds is not None else "never"
        line = (f"{what}: {did}; loop lag max {self.lag * 1000:.0f} ms; RSS growth {self.rss_growth_mib:.1f} MiB;"
                f" victim saw its burst in {victim}")  # fmt: skip
        print("\nATTACK " + line)
        return line

    def check(self) -> None:
        assert self.lag <= MAX_LOOP_LAG, f"event loop stalled {self.lag * 1000:.0f} ms"
        assert self.rss_growth_mib <= MAX_RSS_GROWTH_MIB, f"RSS grew {self.rss_growth_mib:.0f} MiB"
        assert self.victim_seconds is not None and self.victim_seconds <= VICTIM_DEADLINE, self.victim_seconds


def under_attack(
    attacker_url: str, victim: RedisServer, done: Callable[[Attack], bool], *, timeout: float = 30.0
) -> Attack:
    """Poll the attacker's broker and the victim's through one registry (as the autoscaler does) until
    ``done``; 1.1 s in, the victim gets a burst of 50 messages and must see it within 1.5 s."""
    out = Attack()
    victim_client = victim.client()
    victim_client.delete("victim")
    attacked_refs, victim_refs = queue_refs(["celery"]), queue_refs(["victim"])

    async def main() -> None:
        registry = BrokerRegistry(connect, max_age=0.0)
        stop = asyncio.Event()

        async def lag_probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.010)
                out.lag = max(out.lag, time.perf_counter() - t - 0.010)

        async def attacked() -> None:
            poller = await registry.poller_for("tenant/attacker", attacker_url)
            while not stop.is_set():
                try:
                    out.readings.append(await poller.read("tenant/attacker", attacked_refs))
                except BrokerError as err:
                    out.errors.append(err)
                if done(out) and out.victim_seconds is not None:
                    stop.set()
                await asyncio.sleep(POLL_EVERY)

        burst_at: list[float] = []

        async def burst() -> None:
            await asyncio.sleep(1.1)  # between two of the victim's polls
            await asyncio.to_thread(victim_client.rpush, "victim", *range(50))
            burst_at.append(time.perf_counter())

        async def victim_pool() -> None:
            # The victim's own poll loop, unaware of the burst: it must see it within its deadline.
            poller = await registry.poller_for("other/victim", victim.url)
            while out.victim_seconds is None and not stop.is_set():
                try:
                    reading = await poller.read("other/victim", victim_refs)
                    if burst_at and reading.depth(victim_refs[0]) == 50:
                        out.victim_seconds = time.perf_counter() - burst_at[0]
                except BrokerError:
                    pass
                await asyncio.sleep(POLL_EVERY)

        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        before = rss_mib("VmRSS")
        tasks = [asyncio.create_task(t()) for t in (lag_probe, attacked, victim_pool, burst)]
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await registry.aclose()
        out.rss_growth_mib = rss_mib("VmHWM") - before

    try:
        asyncio.run(main())
    finally:
        victim_client.close()
    return out


def last_summary(attack: Attack) -> UnackedSummary:
    return attack.readings[-1].unacked[KeyLayout()]


def fill_unacked(client: redis.Redis[bytes], entries: list[tuple[str, str, str, int]]) -> None:
    """kombu's shape: `unacked` (tag -> [payload, exchange, routing key]) and `unacked_index` (tag -> time)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i, (tag, exchange, routing_key, size) in enumerate(entries):
        payload = {"body": "x" * max(0, size - 200), "headers": {}}
        pipe.hset("unacked", tag, json.dumps([payload, exchange, routing_key]))
        pipe.zadd("unacked_index", {tag: now})
        if i % 200 == 199:
            pipe.execute()
    pipe.execute()


class Pinger:
    """Another client of the attacked Redis: PING every 10 ms, the worst reply time kept."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            self.client.ping()
            self.worst = max(self.worst, time.perf_counter() - t)
            self.stop.wait(0.010)

    def __enter__(self) -> Pinger:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def test_huge_unacked_values_never_stall_redis_the_loop_or_the_victim(
    redis_db: redis.Redis[bytes], redis_server: RedisServer, victim: RedisServer
) -> None:
    # 800 ordinary 100 KB messages and 10 of 4 MiB (past the 1 MiB bound per value): main's HSCAN
    # walk copied all of them into Lua in one EVAL.
    entries = [(f"tag-{i:05d}", "", "celery", 100 * 1024) for i in range(800)]
    entries += [(f"big-{i:02d}", "", "celery", 4 * 1024 * 1024) for i in range(10)]
    fill_unacked(redis_db, entries)
    redis_db.config_set("slowlog-log-slower-than", 0)
    redis_db.config_set("slowlog-max-len", 10_000)
    redis_db.slowlog_reset()

    def whole_walk(a: Attack) -> bool:
        return bool(a.readings) and last_summary(a).scanned == 810 and last_summary(a).age_seconds == 0

    with Pinger(redis_server) as pinger:
        attack = under_attack(redis_server.url, victim, whole_walk, timeout=60)
    evals = [e for e in redis_db.slowlog_get(10_000) if e["command"].startswith(b"EVAL_RO")]
    worst_eval = max(e["duration"] for e in evals) / 1e6
    summary = last_summary(attack)
    attack.report(
        "unacked = 800 x 100 KB + 10 x 4 MiB",
        f"{len(evals)} EVALs of at most {worst_eval * 1000:.1f} ms (Redis time), another client's PING waited at most"
        f" {pinger.worst * 1000:.0f} ms; walk whole after {len(attack.readings)} polls: in flight"
        f" {attack.readings[-1].in_flight[(KeyLayout(), 'celery')]}, too large {summary.too_large}",
    )
    assert attack.errors == []  # never "unreachable", never our own script timing out
    assert summary.too_large == 10 and summary.unattributed == 10
    assert attack.readings[-1].in_flight[(KeyLayout(), "celery")] == 800
    assert worst_eval <= 0.050, f"one EVAL held Redis {worst_eval * 1000:.0f} ms"
    assert pinger.worst <= 0.200, f"another client waited {pinger.worst * 1000:.0f} ms"
    attack.check()


def test_hostile_topic_bindings_cost_a_bounded_parse_off_the_loop(
    redis_db: redis.Redis[bytes], redis_server: RedisServer, victim: RedisServer
) -> None:
    # 256 wildcard bindings x 436 in-flight routing keys of 254 characters (127 words): within every
    # bound of the script; routing them all costs 111,616 matches of ~1 ms in pure Python.
    members = [f"{'#.' * 63}b{i}{SEP}^x${SEP}q{i}" for i in range(256)]
    redis_db.sadd("_kombu.binding.tasks", *members)
    fill_unacked(redis_db, [(f"tag-{i:03d}", "tasks", "a." * 125 + f"b{i:03d}", 500) for i in range(436)])

    def whole_walk(a: Attack) -> bool:
        return bool(a.readings) and last_summary(a).scanned == 436 and last_summary(a).age_seconds == 0

    attack = under_attack(redis_server.url, victim, whole_walk, timeout=30)
    summary = last_summary(attack)
    attack.report(
        "256 topic bindings x 436 in-flight entries, 254-character routing keys",
        f"each poll routed within its budget: {summary.unrouted} entries counted unrouted (unattributed"
        f" {summary.unattributed}), {len(attack.readings)} polls, 0 errors",
    )
    assert attack.errors == []
    assert summary.unrouted > 0 and summary.unattributed >= summary.unrouted
    attack.check()


class HugeReplyServer:
    """Not Redis: answers anything with the header of a huge reply, then streams its body."""

    def __init__(self, header: bytes, body_chunk: bytes) -> None:
        self.header, self.chunk = header, body_chunk
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.header)
                for _ in range(300):  # up to 300 MiB
                    conn.sendall(self.chunk)
                    self.sent += len(self.chunk)
            except OSError:
                return  # the client dropped the connection: what we want

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("header", "chunk", "what", "kind"),
    [
        pytest.param(b"$314572800\r\n", b"x" * (1 << 20), "a 300 MiB bulk string", ErrorKind.REPLY_TOO_LARGE,
                     id="bulk-300-MiB"),
        pytest.param(b"*100000000\r\n", b":1\r\n" * (1 << 18), "an array of 1e8 integers", ErrorKind.REPLY_TOO_LARGE,
                     id="array-1e8"),
        # The largest array the bound lets through is parsed on the loop: it must still be short.
        pytest.param(b"*10000\r\n", b":1\r\n" * 10_000, "an array of 10,000 integers (the most allowed)",
                     ErrorKind.RESPONSE_ERROR, id="array-at-the-bound"),
    ],
)  # fmt: skip
def test_a_huge_reply_from_a_non_redis_server_is_refused_unread(
    victim: RedisServer, header: bytes, chunk: bytes, what: str, kind: ErrorKind
) -> None:
    server = HugeReplyServer(header, chunk)
    try:
        attack = under_attack(f"redis://127.0.0.1:{server.port}/0", victim, lambda a: len(a.errors) >= 3)
    finally:
        server.close()
    kinds = {e.kind for e in attack.errors}
    attack.report(
        f"a fake server answering every poll with {what}",
        f"{', '.join(sorted(k.value for k in kinds))}, connection dropped;"
        f" the server got {server.sent / (1 << 20):.0f} MiB out before the drop",
    )
    assert kinds == {kind}
    assert attack.readings == []
    attack.check()
