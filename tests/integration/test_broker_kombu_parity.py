"""Our depth and in-flight equal kombu's own count, for Redis brokers configured the way users do.

Messages are sent by real Celery producers (``apply_async``) and reserved by a real kombu consumer
(``basic_get`` without ack puts them in ``unacked``, as a worker's prefetch does). The truth is the
app's own channel: ``_size(queue)`` for what waits, and every ``unacked`` entry routed by the
channel's ``_lookup`` for what is in flight.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from celery_fleet.brokers import DepthReading, QueueRef, queue_refs
from celery_fleet.brokers.redis.connection import connect
from celery_fleet.brokers.source import DEFAULT_SEP, KeyLayout
from celery_fleet.planning.scaling import Observation
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

TASK = "parity.noop"


def read(url: str, refs: Sequence[QueueRef]) -> DepthReading:
    async def main() -> DepthReading:
        source = connect(url)
        try:
            return await source.read(refs)
        finally:
            await source.aclose()

    return asyncio.run(main())


@contextmanager
def celery(url: str, options: dict[str, Any] | None = None, queues: Sequence[Any] = ()) -> Iterator[Any]:
    from celery import Celery

    app = Celery("parity", broker=url)
    app.conf.broker_transport_options = options or {}
    if queues:
        app.conf.task_queues = list(queues)
    try:
        yield app
    finally:
        app.close()


def truth(app: Any, queues: Sequence[str]) -> Observation:
    """kombu's count: list sizes, and unacked entries whose kombu route reaches one of ``queues``."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for queue in app.conf.task_queues or ():
            queue.exchange.declare(channel=channel)  # Redis stores no exchange types; kombu keeps them in memory
        depth = sum(channel._size(q) for q in queues)
        in_flight = 0
        if channel.ack_emulation:
            # A plain client and the prefixed key name: kombu's prefixing client does not prefix HVALS.
            raw_client = redis.Redis.from_url(app.conf.broker_url.split(";")[-1])
            try:
                values = raw_client.hvals(channel.global_keyprefix + channel.unacked_key)
            finally:
                raw_client.close()
            for raw in values:
                _payload, exchange, routing_key = json.loads(raw)
                if set(channel._lookup(exchange, routing_key)) & set(queues):
                    in_flight += 1
    return Observation(depth, in_flight)


def reserve(app: Any, queue: str, n: int) -> Any:
    """Take ``n`` messages off ``queue`` without acking them (they move to ``unacked``)."""
    conn = app.connection_for_read()
    channel = conn.channel()
    for _ in range(n):
        assert channel.basic_get(queue, no_ack=False) is not None
    return conn  # closing it would restore the messages


def ours(reading: DepthReading, refs: Sequence[QueueRef], names: Sequence[str]) -> Observation:
    observation = reading.observe([r for r in refs if r.name in names])
    assert isinstance(observation, Observation), observation
    return Observation(observation.queue_depth, observation.in_flight)


# -- routing (issue 14.5, issue 13.3) -----------------------------------------------------------------------


def test_routing_matches_kombu_shared_keys_topics_and_unbound(
    redis_db: redis.Redis[bytes], redis_server: RedisServer
) -> None:
    from kombu import Exchange, Queue

    tasks, events = Exchange("tasks", "direct"), Exchange("events", "topic")
    queues = [
        Queue("copy_a", tasks, routing_key="shared"),
        Queue("copy_b", tasks, routing_key="shared"),
        Queue("users", events, routing_key="user.*"),
        Queue("audit", events, routing_key="#.audit"),
    ]
    names = ["copy_a", "copy_b", "users", "audit"]
    refs = queue_refs(names)
    with celery(redis_server.url, queues=queues) as app:
        with app.connection_for_write() as conn:
            for q in queues:
                q.bind(conn.default_channel).declare()
        for _ in range(3):  # one copy in each of copy_a and copy_b
            app.send_task(TASK, exchange=tasks, routing_key="shared", declare=[tasks])
        for key in ("user.signup", "billing.audit", "user.signup.audit"):  # the last reaches both topics
            app.send_task(TASK, exchange=events, routing_key=key, declare=[events])
        app.send_task(TASK, exchange=tasks, routing_key="nobody", declare=[tasks])  # no binding: kombu drops it
        held = [reserve(app, "copy_a", 2), reserve(app, "copy_b", 2), reserve(app, "users", 1)]
        try:
            reading = read(redis_server.url, refs)
            for group in (["copy_a"], ["copy_b"], ["copy_a", "copy_b"], ["users"], ["audit"], names):
                assert ours(reading, refs, group) == truth(app, group), group
            # The shared routing key's copies share delivery tags: 2 unacked entries, not 4.
            assert truth(app, ["copy_a", "copy_b"]).in_flight == 2
        finally:
            for conn in held:
                conn.release()


def test_a_planted_catastrophic_pattern_is_never_compiled(
    redis_db: redis.Redis[bytes], redis_server: RedisServer
) -> None:
    """A tenant writes a backtracking regex into a binding: the poll still answers at once, correctly."""
    sep = DEFAULT_SEP
    redis_db.sadd("_kombu.binding.evil", f"a.*{sep}^(a|a?)+$" + f"{sep}victim")
    entry = json.dumps([{"body": ""}, "evil", "a" * 40 + "!"])
    redis_db.hset("unacked", mapping={f"tag{i}": entry for i in range(50)})
    redis_db.hset("unacked", "ok", json.dumps([{"body": ""}, "evil", "a.b"]))
    refs = queue_refs(["victim"])
    started = time.perf_counter()
    reading = read(redis_server.url, refs)
    took = time.perf_counter() - started
    assert ours(reading, refs, ["victim"]) == Observation(0, 1)  # word rules: only "a.b" matches "a.*"
    assert reading.unacked[KeyLayout()].unattributed == 50
    print(f"poll with a planted backtracking pattern: {took * 1000:.1f} ms")


def test_reply_sizes_are_bounded_by_the_script(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    sep = DEFAULT_SEP
    redis_db.sadd("_kombu.binding.huge", *[f"k{i}{sep}{sep}q" for i in range(300)])  # > 256 members
    redis_db.sadd("_kombu.binding.long", f"k{sep}{sep}q", "x" * 5000)  # an oversized member is skipped
    redis_db.hset(
        "unacked",
        mapping={
            "a": json.dumps([{}, "huge", "k1"]),
            "b": json.dumps([{}, "long", "k"]),
            "c": json.dumps([{}, "x" * 300, "k"]),  # exchange name over 255 bytes
        },
    )
    reading = read(redis_server.url, queue_refs(["q"]))
    assert reading.observe(queue_refs(["q"])) == Observation(0, 1, in_flight_exact=True)
    assert reading.unacked[KeyLayout()].unattributed == 2


# -- failover URL lists (issue 14.6) ------------------------------------------------------------------------


def test_failover_list_is_followed_as_kombu_follows_it(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    """The first alternate is down: kombu publishes to the second, and so do our reads and the probe."""
    import os
    import socket
    import subprocess
    import sys

    from celery_fleet.api.models import BROKER_URL_ENV
    from celery_fleet.planning.workload import BROKER_CONNECTED_PROBE
    from tests.support.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0;{redis_server.url}"
    refs = queue_refs(["celery"])
    with celery(url) as app:
        for _ in range(5):
            app.send_task(TASK)
        assert ours(read(url, refs), refs, ["celery"]) == truth(app, ["celery"]) == Observation(5, 0)

    def probe() -> int:
        env = {**os.environ, BROKER_URL_ENV: url}
        return subprocess.run([sys.executable, "-c", BROKER_CONNECTED_PROBE], env=env, capture_output=True).returncode

    # The probe looks in /proc/net/tcp for a connection to any alternate's port (this test holds one).
    with socket.create_connection((redis_server.host, redis_server.port)):
        assert probe() == 0


# -- key layout from transport options (issue 14.1) ---------------------------------------------------------


def layout_refs(names: Sequence[str], options: dict[str, Any]) -> list[QueueRef]:
    """The refs a pool whose spec.broker mirrors ``options`` reads."""
    layout = KeyLayout(
        options.get("global_keyprefix", ""),
        options.get("sep", DEFAULT_SEP),
        options.get("unacked_key", "unacked"),
        options.get("ack_emulation", True),
    )
    return queue_refs(names, priority_steps=options.get("priority_steps", (0, 3, 6, 9)), layout=layout)


def check_layout(url: str, refs: Sequence[QueueRef]) -> dict[QueueRef, list[str]]:
    async def main() -> dict[QueueRef, list[str]]:
        source = connect(url)
        try:
            return await source.check_layout(refs)
        finally:
            await source.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"sep": ":"}, id="sep"),
        pytest.param({"priority_steps": list(range(10))}, id="ten-priority-steps"),
        pytest.param({"global_keyprefix": "app1:", "sep": "."}, id="prefix-and-sep"),
        pytest.param({"unacked_key": "app_unacked", "global_keyprefix": "t:"}, id="unacked-key"),
        pytest.param({"ack_emulation": False}, id="no-ack-emulation"),
    ],
)
def test_transport_options_are_read_as_kombu_writes_them(
    redis_db: redis.Redis[bytes], redis_server: RedisServer, options: dict[str, Any]
) -> None:
    queue = "celery"
    with celery(redis_server.url, {**options, "queue_order_strategy": "priority"}) as app:
        for i in range(20):
            app.send_task(TASK, priority=i % 10)
        held = reserve(app, queue, 3)
        try:
            refs = layout_refs([queue], options)
            expected = truth(app, [queue])
            assert ours(read(redis_server.url, refs), refs, [queue]) == expected
            assert expected == Observation(17, 0 if options.get("ack_emulation") is False else 3)
            assert check_layout(redis_server.url, refs) == {}
            # A pool left at the defaults: the mismatch is found and named, unless only the unacked key differs.
            default_refs = layout_refs([queue], {"global_keyprefix": options.get("global_keyprefix", "")})
            found = check_layout(redis_server.url, default_refs)
            if "sep" in options or "priority_steps" in options:
                assert found and all(
                    k.startswith(options.get("global_keyprefix", "") + queue) for k in found[default_refs[0]]
                )
        finally:
            held.release()


# -- the smallest ACL user (issue 14.4, issue 13.11) --------------------------------------------------------


def test_the_documented_acl_user_reads_everything(redis_db: redis.Redis[bytes], redis_server: RedisServer) -> None:
    from celery_fleet.brokers import BrokerError, ErrorKind
    from celery_fleet.brokers.redis.scripts import READER_ACL

    password = "acl-reader-pw"
    redis_db.execute_command("ACL", "SETUSER", "fleet-reader", f">{password}", *READER_ACL.split())
    redis_db.execute_command("ACL", "SETUSER", "too-small", f">{password}", *READER_ACL.replace("+eval_ro", "").split())
    db1 = redis_server.url.rsplit("/", 1)[0] + "/1"
    with celery(db1, {"priority_steps": [0, 3, 6, 9]}) as app:
        for i in range(12):
            app.send_task(TASK, priority=i % 10)
        held = reserve(app, "celery", 2)
        try:
            acl_url = db1.replace("redis://", f"redis://fleet-reader:{password}@")
            refs = queue_refs(["celery"])
            assert ours(read(acl_url, refs), refs, ["celery"]) == truth(app, ["celery"]) == Observation(10, 2)
            assert check_layout(acl_url, refs) == {}
            with pytest.raises(BrokerError) as err:
                read(db1.replace("redis://", f"redis://too-small:{password}@"), refs)
            assert err.value.kind is ErrorKind.AUTH_FAILED and password not in str(err.value)
        finally:
            held.release()


# -- Redis Sentinel (issue 14.3) ----------------------------------------------------------------------------


class SentinelSet:
    """A master, a replica and three real redis-sentinel processes watching them (quorum 2)."""

    def __init__(self, root: Any) -> None:
        import shutil
        import subprocess

        from tests.support.redis_server import free_port

        binary = shutil.which("redis-sentinel")
        if binary is None:
            pytest.fail("redis-sentinel not found: run `make install-system` (apt-get install redis-sentinel)")
        self.master = RedisServer(root / "master")
        self.replica = RedisServer(root / "replica")
        self.master.start()
        self.replica.start()
        self.replica.client().execute_command("REPLICAOF", "127.0.0.1", self.master.port)
        self.ports = [free_port() for _ in range(3)]
        self.procs = []
        for port in self.ports:
            conf = root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
            )
            log = (root / f"sentinel-{port}.log").open("wb")
            self.procs.append(subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT))

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.ports)

    def master_port(self) -> int:
        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")[1])
        finally:
            client.close()

    def settled_away_from(self, old: int) -> bool:
        """Every Sentinel names a new master and calls it healthy, as redis-py's discover_master demands.

        One Sentinel's GET-MASTER-ADDR-BY-NAME changing is not that: redis-py reads SENTINEL MASTERS from
        each Sentinel and takes only an entry flagged master, not s_down or o_down. CI once asked in
        between and found none ("No master found for 'mymaster'"). Traced here, one Sentinel's entry
        went s_down, o_down + failover_in_progress, the new port as master,disconnected, then plain
        master. So wait until every Sentinel's entry names another port with the plain flags ``master``.
        """
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
            try:
                fields = client.execute_command("SENTINEL", "MASTER", "mymaster")
            except redis.RedisError:
                return False
            finally:
                client.close()
            state = dict(zip(fields[::2], fields[1::2], strict=True)) if isinstance(fields, list) else fields
            if int(state["port"]) == old or state["flags"] != "master":
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)
        self.master.stop()
        self.replica.stop()


@pytest.fixture
def sentinels(tmp_path: Any) -> Iterator[SentinelSet]:
    from tests.support.wait import wait_for

    s = SentinelSet(tmp_path)
    try:
        wait_for(lambda: s.master_port() == s.master.port, timeout=20, message="the Sentinels to know the master")
        wait_for(
            lambda: s.replica.client().info("replication").get("master_link_status") == "up",
            timeout=20,
            message="the replica to sync",
        )
        yield s
    finally:
        s.stop()


def test_sentinel_is_read_as_kombu_reads_it_and_a_failover_is_followed(sentinels: SentinelSet) -> None:
    from celery_fleet.brokers import BrokerError
    from tests.support.wait import wait_for

    refs = queue_refs(["celery"])
    options = {"master_name": "mymaster", "priority_steps": [0, 3, 6, 9]}

    async def poll_until_answer(source: Any) -> DepthReading:
        # During the switch a poll fails (the autoscaler holds replicas then); it never reads a wrong depth.
        failures = 0
        for _ in range(400):
            try:
                return await source.read(refs)
            except BrokerError:
                failures += 1
                await asyncio.sleep(0.05)
        raise AssertionError(f"no answer after {failures} failed polls")

    async def main() -> None:
        source = connect(sentinels.url, master_name="mymaster")
        try:
            with celery(sentinels.url, options) as app:
                for i in range(10):
                    app.send_task(TASK, priority=i % 10)
                assert ours(await source.read(refs), refs, ["celery"]) == truth_sentinel(app) == Observation(10, 0)
                assert sentinels.master.client().execute_command("WAIT", 1, 5000) == 1  # the replica has all 10
                old = sentinels.master.port
                sentinels.master.proc.kill()  # type: ignore[union-attr]
                sentinels.master.proc.wait()  # type: ignore[union-attr]
                wait_for(
                    lambda: sentinels.settled_away_from(old),
                    timeout=30,
                    message="every Sentinel to name the new master, failover done",
                )
            with celery(sentinels.url, options) as app:
                for i in range(5):
                    app.send_task(TASK, priority=i % 10)  # kombu asks the Sentinels: the new master
                reading = await poll_until_answer(source)
                expected = truth_sentinel(app)
                assert ours(reading, refs, ["celery"]) == expected
                assert expected == Observation(15, 0)
        finally:
            await source.aclose()

    asyncio.run(main())


def truth_sentinel(app: Any) -> Observation:
    with app.connection_for_read() as conn:
        return Observation(conn.default_channel._size("celery"), 0)
