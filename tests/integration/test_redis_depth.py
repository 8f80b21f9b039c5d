"""The depth reader against a real redis-server, filled by real Celery producers and workers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from celery_fleet.brokers import (
    BrokerError,
    DepthReading,
    ErrorKind,
    QueueRef,
    UnackedSummary,
    queue_refs,
    redis_registry,
)
from celery_fleet.brokers.redis.connection import TlsSettings, connect
from celery_fleet.brokers.source import KeyLayout
from celery_fleet.planning.scaling import Observation, ReadFailure
from tests.support.celery_depth_app import HOLD
from tests.support.cluster import ROOT
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

QUEUE = "high_priority"
SEP = "\x06\x16"


def read(url: str, refs: list[QueueRef], connect_timeout: float = 1.0, read_timeout: float = 2.0) -> DepthReading:
    async def main() -> DepthReading:
        source = connect(url, connect_timeout=connect_timeout, read_timeout=read_timeout)
        try:
            return await source.read(refs)
        finally:
            await source.aclose()

    return asyncio.run(main())


def celery_app(url: str, keyprefix: str = ""):  # type: ignore[no-untyped-def]  # celery is untyped
    from celery import Celery

    options: dict[str, object] = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    if keyprefix:
        options["global_keyprefix"] = keyprefix
    app = Celery("producer", broker=url)
    app.conf.broker_transport_options = options
    return app


def send(url: str, n: int, *, keyprefix: str = "", priorities: bool = True, args: tuple[str, ...] = ()) -> None:
    """Publish with Celery's own send_task, priorities 0..9 in turn (kombu picks the sub-list)."""
    app = celery_app(url, keyprefix)
    try:
        for i in range(n):
            app.send_task(
                HOLD, args=args or ("/nonexistent", "/tmp"), queue=QUEUE, priority=(i % 10) if priorities else None
            )
    finally:
        app.close()


def seen(reading: DepthReading, refs: list[QueueRef]) -> Observation:
    observation = reading.observe(refs)
    assert isinstance(observation, Observation), observation
    return observation


def test_depth_counts_every_priority_list(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    send(redis_server.url, 40)
    send(redis_server.url, 5, priorities=False)
    reading = read(redis_server.url, queue_refs([QUEUE, "low_priority"]))
    (ref, low) = queue_refs([QUEUE, "low_priority"])
    assert seen(reading, [ref]).queue_depth == 45
    assert seen(reading, [low]).queue_depth == 0
    # What a plain `LLEN high_priority` (KEDA's Redis Lists scaler) would have reported:
    assert redis_db.llen(QUEUE) < 45
    assert sum(1 for n in reading.queued[ref].values() if n) >= 3


def test_global_keyprefix_is_honoured(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    send(redis_server.url, 12, keyprefix="fleet:")
    prefixed = queue_refs([QUEUE], keyprefix="fleet:")
    bare = queue_refs([QUEUE])
    reading = read(redis_server.url, prefixed + bare)
    assert seen(reading, prefixed).queue_depth == 12
    assert seen(reading, bare).queue_depth == 0


def test_pools_on_one_broker_share_one_poll(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    send(redis_server.url, 7)
    pools = {f"ns/pool-{i}": queue_refs([QUEUE, f"q{i}a", f"q{i}b"]) for i in range(5)}

    async def main() -> dict[str, DepthReading]:
        registry = redis_registry()
        try:
            pollers = {owner: await registry.poller_for(owner, redis_server.url) for owner in pools}
            assert len({id(p) for p in pollers.values()}) == 1
            for owner, refs in pools.items():
                pollers[owner].want(owner, refs)
            before = commandstats(redis_db)
            results = await asyncio.gather(*(pollers[o].read(o, refs) for o, refs in pools.items()))
            after = commandstats(redis_db)
            distinct_queues = len({r for refs in pools.values() for r in refs})
            assert after.get("eval_ro", 0) - before.get("eval_ro", 0) == 1
            assert after.get("llen", 0) - before.get("llen", 0) == distinct_queues * 4
            assert next(iter(pollers.values())).polls == 1
            return dict(zip(pools, results, strict=True))
        finally:
            await registry.aclose()

    results = asyncio.run(main())
    for owner, reading in results.items():
        assert seen(reading, pools[owner][:1]).queue_depth == 7


def test_poll_script_parses_every_unacked_shape(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    """The Lua side: the fast tail walk, its cjson fallback, bindings, and a queue name taken by a hash."""
    body = {"body": "eyJ4IjogWyIsIiwgIlwiIl19", "headers": {"argsrepr": '[", \\"q\\"]'}}
    entries: dict[str | bytes, bytes | float | int | str] = {
        "plain": json.dumps([body, "q1", "q1"]),
        "compact": json.dumps([body, "q1", "q1"], separators=(",", ":")),
        "anonymous": json.dumps([body, "", "q2"]),
        "unicode-key": json.dumps([body, "", "q\u00e9"]),  # escaped in JSON: cjson decodes it
        "quote-in-key": json.dumps([body, "", 'q"3']),
        "bound": json.dumps([body, "tasks", "urgent"]),
        "garbage": "not json",
    }
    redis_db.hset("unacked", mapping=entries)
    redis_db.sadd("_kombu.binding.tasks", f"urgent{SEP}{SEP}q4")
    redis_db.sadd("_kombu.binding.q1", f"q1{SEP}{SEP}q1")  # Celery's default: direct exchange named after the queue
    redis_db.hset("broken", "field", "value")  # a queue name taken by a non-list key
    redis_db.rpush(f"q1{SEP}6", "m1", "m2")
    refs = queue_refs(["q1", "q2", "qé", 'q"3', "q4", "broken"])
    reading = read(redis_server.url, refs)
    by_name = {r.name: r for r in refs}
    assert seen(reading, [by_name["q1"]]) == Observation(2, 2)
    assert [seen(reading, [by_name[q]]).in_flight for q in ("q2", "qé", 'q"3', "q4")] == [1, 1, 1, 1]
    assert reading.unacked[KeyLayout()] == UnackedSummary(size=7, scanned=7, unattributed=1)
    broken = reading.observe([by_name["broken"]])
    assert isinstance(broken, ReadFailure) and "WRONGTYPE" in broken.message


def commandstats(client: redis.Redis[bytes]) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


# -- in flight: a real worker -----------------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    release: Path
    started: Path
    log: Path

    def running(self) -> int:
        return len(list(self.started.iterdir()))


@pytest.fixture
def worker_factory(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*, acks_late: bool, concurrency: int = 2, prefetch: int = 2) -> Worker:
        n = len(workers)
        release, started, log = tmp_path / f"release-{n}", tmp_path / f"started-{n}", tmp_path / f"worker-{n}.log"
        started.mkdir()
        env = {
            **os.environ,
            "DEPTH_BROKER_URL": redis_server.url,
            "DEPTH_ACKS_LATE": "1" if acks_late else "0",
            "PYTHONPATH": str(ROOT),
        }
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.support.celery_depth_app", "worker",
            "-Q", QUEUE, "--pool=threads", f"--concurrency={concurrency}", f"--prefetch-multiplier={prefetch}",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"depth{n}@%h", "--loglevel=INFO",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        w = Worker(proc, release, started, log)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.release.touch()
        w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


@pytest.mark.parametrize(
    ("acks_late", "in_flight", "queued"),
    [
        # Late ack: the 2 running tasks and the 2 prefetched ones (prefetch = 2 x 2) stay unacked.
        pytest.param(True, 4, 6, id="acks-late-counts-running-and-prefetched"),
        # Early ack (Celery's default): a task is acked as it starts, so only the 4 prefetched
        # messages are in `unacked`; the 2 running ones are invisible to any Redis-side count.
        pytest.param(False, 4, 4, id="early-ack-counts-prefetched-only"),
    ],
)
def test_in_flight_counts_unacked_messages_of_a_real_worker(
    redis_db: redis.Redis[bytes],
    redis_server: RedisServer,
    worker_factory: Callable[..., Worker],
    acks_late: bool,
    in_flight: int,
    queued: int,
) -> None:
    worker = worker_factory(acks_late=acks_late)
    send(redis_server.url, 10, args=(str(worker.release), str(worker.started)))
    refs = queue_refs([QUEUE])

    def settled() -> DepthReading | None:
        assert worker.proc.poll() is None, f"worker exited: {worker.log.read_text()[-2000:]}"
        r = read(redis_server.url, refs)
        now = seen(r, refs)
        return r if worker.running() == 2 and (now.queue_depth, now.in_flight) == (queued, in_flight) else None

    reading = wait_for(
        settled,
        timeout=90,
        interval=0.2,
        message=lambda: (
            f"{queued} queued + {in_flight} in flight, 2 running; last: "
            f"{read(redis_server.url, refs).observe(refs)}, running={worker.running()}"
        ),
    )
    assert reading.unacked[KeyLayout()].exact and reading.unacked[KeyLayout()].size == in_flight

    worker.release.touch()
    wait_for(
        lambda: seen(read(redis_server.url, refs), refs) == Observation(0, 0),
        timeout=60,
        message="the queue to drain and nothing in flight",
    )


# -- failures ---------------------------------------------------------------------------------------------


def failure(url: str, connect_timeout: float = 1.0, read_timeout: float = 2.0) -> tuple[BrokerError, float]:
    started = time.monotonic()
    with pytest.raises(BrokerError) as err:
        read(url, queue_refs([QUEUE]), connect_timeout, read_timeout)
    return err.value, time.monotonic() - started


def test_stopped_redis_fails_fast_as_unreachable(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.stop()
    try:
        err, elapsed = failure(url, connect_timeout=1.0, read_timeout=1.0)
    finally:
        redis_server.start()
    assert err.kind is ErrorKind.UNREACHABLE
    assert elapsed < 3
    assert f"{redis_server.host}:{redis_server.port}" in str(err)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung or black-holed broker)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(server.getsockname()[1])
    stop.set()
    t.join()
    for s in accepted:
        s.close()
    server.close()


def test_hung_broker_times_out_within_the_bound(silent_port: int) -> None:
    err, elapsed = failure(f"redis://127.0.0.1:{silent_port}/0", connect_timeout=0.5, read_timeout=0.5)
    assert err.kind is ErrorKind.TIMEOUT
    assert elapsed < 2.5  # connect + 2 x read timeout, plus slack for a loaded machine


PASSWORD = "correct-horse-battery"
WRONG = "Tr0ub4dor&3-wrong"


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "userinfo",
    [
        pytest.param(f":{WRONG}@", id="wrong-password"),
        pytest.param(f"default:{WRONG}@", id="wrong-password-with-user"),
        pytest.param("", id="no-password"),
    ],
)
def test_auth_failure_is_classified_and_never_shows_a_password(secured_redis: RedisServer, userinfo: str) -> None:
    url = f"redis://{userinfo}{secured_redis.host}:{secured_redis.port}/0"
    err, _ = failure(url)
    assert err.kind is ErrorKind.AUTH_FAILED
    shown = "".join(traceback.format_exception(err)) + repr(err)
    for secret in (PASSWORD, WRONG, "Tr0ub4dor"):
        assert secret not in shown


def test_right_password_reads(secured_redis: RedisServer) -> None:
    send(secured_redis.url, 3)
    try:
        reading = read(secured_redis.url, queue_refs([QUEUE]))
        assert seen(reading, queue_refs([QUEUE])).queue_depth == 3
    finally:
        secured_redis.client().flushall()


# -- TLS ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS (self-signed cert for 127.0.0.1) and wants a password."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: install it (apt-get install openssl) to test rediss://")
    tmp = tmp_path_factory.mktemp("redis-tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=(tmp / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client = redis.Redis(
            host="127.0.0.1", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(cert), socket_timeout=2
        )
        wait_for(client.ping, timeout=15, message="TLS redis-server to answer PING")
        client.close()
        yield port, cert
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tls_with_the_ca_reads(tls_redis: tuple[int, Path]) -> None:
    port, cert = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=CERT_REQUIRED"
    send(f"{url}&ssl_ca_certs={cert}".replace("CERT_REQUIRED", "required"), 4)  # Celery takes the CA from its URL
    tls = TlsSettings(ca_pem=cert.read_text())

    async def main() -> DepthReading:
        source = connect(url, tls=tls)
        try:
            return await source.read(queue_refs([QUEUE]))
        finally:
            await source.aclose()

    assert seen(asyncio.run(main()), queue_refs([QUEUE])).queue_depth == 4


def test_tls_with_an_unknown_ca_is_unreachable(tls_redis: tuple[int, Path]) -> None:
    port, _ = tls_redis
    err, _ = failure(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required")
    assert err.kind is ErrorKind.UNREACHABLE
    assert "CERTIFICATE_VERIFY_FAILED" in str(err) and PASSWORD not in str(err)


def test_unacked_past_the_visibility_timeout_is_stale_not_in_flight(
    redis_db: redis.Redis[bytes], redis_server: RedisServer
) -> None:
    """kombu's own channel delivers a message and is never heard of again (as a SIGKILLed worker):
    within the visibility timeout it is in flight, past it stale; the entry stays restorable."""
    from kombu import Connection

    long_refs, short_refs = queue_refs([QUEUE]), queue_refs([QUEUE], layout=KeyLayout(visibility_timeout=1))
    with Connection(redis_server.url, transport_options={"visibility_timeout": 1}) as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"n": 1})
        queue.get(timeout=5)  # delivered, not acked: kombu's `unacked` hash and `unacked_index` zset
        fresh = seen(read(redis_server.url, long_refs), long_refs)
        assert (fresh.in_flight, fresh.stale_unacked) == (1, 0)
        stale = wait_for(
            lambda: (o := seen(read(redis_server.url, short_refs), short_refs)).stale_unacked == 1 and o,
            timeout=10,
            message="the delivery is older than the 1 s visibility timeout",
        )
        assert stale.in_flight == 0
        reading = read(redis_server.url, short_refs)
        assert reading.unacked[short_refs[0].layout].stale == 1
        # Read-only: kombu can still restore it.
        assert (redis_db.hlen("unacked"), redis_db.zcard("unacked_index")) == (1, 1)
        queue.close()
