"""The control path (our pidbox client) against real Celery workers and a real Redis; hostile
workers as test threads on the pidbox channel; TLS with a private CA and a man-in-the-middle.

No cluster: the remote-control calls the autoscaler makes before a scale-down, one by one.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from celery_fleet.brokers.control import ControlError, ControlTarget, PidboxControl
from celery_fleet.brokers.redis.connection import CERTIFICATE_FILES, TlsSettings
from celery_fleet.brokers.redis.pidbox import CONTROL_ACL, POP_SCRIPT, Mailbox
from celery_fleet.planning.scale_in import WorkerReport
from tests.support.cluster import ROOT
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

APP_DIR = ROOT / "tests" / "support"

# A worker app whose kombu transport options and TLS come from the environment (sep, key prefix).
CTLAPP = """
import json, os, ssl, time
from celery import Celery
app = Celery("ctlapp", broker=os.environ["CELERY_BROKER_URL"])
app.conf.task_ignore_result = True
app.conf.broker_transport_options = json.loads(os.environ.get("CTL_TRANSPORT", "{}"))
if os.environ.get("CTL_TLS"):
    tls = json.loads(os.environ["CTL_TLS"])
    app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, **tls}

@app.task(name="ctl.hold")
def hold(seconds):
    time.sleep(seconds)
"""


class Worker:
    """`celery -A <app> worker` with the flags the operator gives a tier (hostname celery@<pod>)."""

    def __init__(
        self,
        url: str,
        pod: str,
        queue: str,
        log_dir: Path,
        argv: list[str] | None = None,
        app: str = "plainapp",
        path: Path = APP_DIR,
        **env: str,
    ) -> None:
        self.pod = pod
        self.log = log_dir / f"{pod}.log"
        args = [sys.executable, "-m", "celery", *(argv or [
            "-A", app, "worker", "-Q", queue, "--concurrency", "1",
            "--pool", "prefork", "--prefetch-multiplier", "1", "-O", "fair", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel", "INFO", "--hostname", f"celery@{pod}",
        ])]  # fmt: skip
        full_env = dict(os.environ, CELERY_BROKER_URL=url, POD_NAME=pod, PYTHONPATH=str(path), **env)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def ctlapp(tmp_path: Path) -> Path:
    (tmp_path / "ctlapp.py").write_text(CTLAPP)
    return tmp_path


class Control:
    """The operator's control client on one event loop (as in the operator), driven from the test."""

    def __init__(self, timeout: float = 1.5) -> None:
        self.runner = asyncio.Runner()
        self.client = PidboxControl(timeout=timeout)

    def census(
        self, target: ControlTarget | str, pods: list[str], timeout: float | None = None
    ) -> dict[str, WorkerReport]:
        t = ControlTarget(target) if isinstance(target, str) else target
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.runner.run(self.client.census(t, pods, deadline=deadline))

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()


@pytest.fixture
def control() -> Iterator[Control]:
    c = Control()
    yield c
    c.close()


def _producer(url: str, **transport: Any) -> Celery:
    app = Celery("producer", broker=url)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_transport_options = transport
    return app


def _answers(control: Control, target: ControlTarget | str, pods: list[str]) -> bool:
    return all(r.answered for r in control.census(target, pods).values())


def _no_control_keys(client: redis.Redis) -> list[bytes]:
    """Reply lists and reply bindings our requests left behind (an empty set is no key)."""
    return list(client.scan_iter(match="*reply.celery.pidbox*"))


def test_census_sees_running_reserved_scheduled_queues_and_silent_workers(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: Control, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "busy-0", "work", tmp_path))
    workers.append(Worker(url, "idle-1", "later", tmp_path))
    pods = ["busy-0", "idle-1"]
    wait_for(lambda: _answers(control, url, pods), timeout=60, message="both workers answer remote control")

    producer = _producer(url)
    for _ in range(2):
        producer.send_task("plainapp.hold", args=[15], queue="work")
    for _ in range(3):
        producer.send_task("plainapp.hold", args=[1], queue="later", countdown=600)

    def settled() -> dict[str, WorkerReport] | None:
        c = control.census(url, pods)
        return c if c["busy-0"].active == 1 and c["busy-0"].reserved == 1 and c["idle-1"].scheduled == 3 else None

    census = wait_for(settled, timeout=30, message="one running + one reserved on busy-0, 3 scheduled on idle-1")
    # Early ack: the running task is in no Redis key; the reserved one and the countdowns are in `unacked`.
    assert redis_db.hlen("unacked") == 4
    assert census["busy-0"].busy and census["busy-0"].queues == {"work"}
    assert not census["idle-1"].busy and census["idle-1"].queues == {"later"}
    assert _no_control_keys(redis_db) == []

    # A stopped worker cannot answer: counted busy, and known to have remote control.
    os.kill(workers[1].proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        silent = control.census(url, pods, timeout=1.0)["idle-1"]
        took = time.monotonic() - started
    finally:
        os.kill(workers[1].proc.pid, signal.SIGCONT)
    assert (silent.answered, silent.remote_control, silent.busy, silent.queues) == (False, True, True, None)
    assert took < 1.1, f"one absolute deadline for the whole census, took {took:.2f}s"
    assert control.client.broadcasts > 0


def test_drain_stops_consuming_and_add_consumer_undoes_it(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: Control, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "drained-0", "work", tmp_path))
    wait_for(lambda: _answers(control, url, ["drained-0"]), timeout=60, message="worker answers")
    target = ControlTarget(url)

    assert control.run(control.client.cancel_consumer(target, ["drained-0"], ["work"])) == {"drained-0"}
    _producer(url).send_task("plainapp.hold", args=[0.1], queue="work")
    assert control.census(url, ["drained-0"])["drained-0"].queues == frozenset()
    assert redis_db.llen("work") == 1 and redis_db.llen("plain:started") == 0

    assert control.run(control.client.add_consumer(target, ["drained-0"], ["work"])) == {"drained-0"}
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=30, message="the task runs once consuming again")
    assert control.census(url, ["drained-0"])["drained-0"].queues == {"work"}


def test_worker_with_remote_control_off_is_reported_as_such(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], control: Control, tmp_path: Path
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "mute-0", "work", tmp_path, PLAIN_REMOTE_CONTROL="0"))
    # Ready = consuming: the task it runs proves the worker is up.
    _producer(url).send_task("plainapp.hold", args=[0.1], queue="work")
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=60, message="the worker is up")
    report = control.census(url, ["mute-0"])["mute-0"]
    assert (report.answered, report.remote_control, report.busy) == (False, False, False)


@pytest.mark.parametrize(
    ("transport", "target_options"),
    [
        pytest.param({"sep": ":"}, {"sep": ":"}, id="sep-colon"),
        pytest.param({"global_keyprefix": "tenant-a:"}, {"global_keyprefix": "tenant-a:"}, id="key-prefix"),
    ],
)
def test_census_follows_the_pools_transport_options(
    redis_server: RedisServer,
    redis_db: Any,
    workers: list[Worker],
    control: Control,
    ctlapp: Path,
    tmp_path: Path,
    transport: dict[str, str],
    target_options: dict[str, str],
) -> None:
    url = redis_server.url
    workers.append(Worker(url, "opt-0", "work", tmp_path, app="ctlapp", path=ctlapp,
                          CTL_TRANSPORT=json.dumps(transport)))  # fmt: skip
    target = ControlTarget(url, **target_options)  # type: ignore[arg-type]
    wait_for(lambda: _answers(control, target, ["opt-0"]), timeout=60,
             message=lambda: f"the worker answers; log:\n{workers[0].log.read_text()[-2000:]}")  # fmt: skip
    _producer(url, **transport).send_task("ctl.hold", args=[20], queue="work")
    report = wait_for(lambda: (r := control.census(target, ["opt-0"])["opt-0"]).active == 1 and r, timeout=30,
                      message="the running task is seen")  # fmt: skip
    assert report.queues == {"work"} and report.busy
    # Without the pool's option the worker cannot be reached or cannot answer: the option matters.
    assert not control.census(url, ["opt-0"], timeout=1.0)["opt-0"].answered
    assert _no_control_keys(redis_db) == []


# -- TLS ---------------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TlsRedis:
    """redis-server with TLS only (private CA, client certificates required) and a password."""

    def __init__(self, workdir: Path, password: str) -> None:
        ca_key, server_key, client_key = _key(), _key(), _key()
        ca = _cert("test-ca", ca_key, None, ca=True)
        self.ca_pem = _pem(ca)
        self.client_cert_pem = _pem(_cert("operator", client_key, (ca, ca_key)))
        self.client_key_pem = _pem_key(client_key)
        files = {"ca.crt": self.ca_pem, "server.crt": _pem(_cert("localhost", server_key, (ca, ca_key), server=True)),
                 "server.key": _pem_key(server_key), "client.crt": self.client_cert_pem,
                 "client.key": self.client_key_pem}  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (workdir / name).write_text(text)
            (workdir / name).chmod(0o600)
        self.dir = workdir
        self.port = free_port()
        self.password = password
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(workdir / "server.crt"), "--tls-key-file", str(workdir / "server.key"),
             "--tls-ca-cert-file", str(workdir / "ca.crt"), "--tls-auth-clients", "yes",
             "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=(workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(self._ping, timeout=10, message="the TLS redis answers")

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, ssl=True,
                           ssl_ca_certs=str(self.dir / "ca.crt"), ssl_certfile=str(self.dir / "client.crt"),
                           ssl_keyfile=str(self.dir / "client.key"), socket_timeout=5)  # fmt: skip

    def _ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def tls_settings(self) -> TlsSettings:
        return TlsSettings(ca_pem=self.ca_pem, cert_pem=self.client_cert_pem, key_pem=self.client_key_pem)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class ManInTheMiddle:
    """A TLS listener with a self-signed certificate that records every byte it is sent."""

    def __init__(self, workdir: Path) -> None:
        key = _key()
        (workdir / "mitm.crt").write_text(_pem(_cert("localhost", key, None, server=True)))
        (workdir / "mitm.key").write_text(_pem_key(key))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(workdir / "mitm.crt", workdir / "mitm.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()  # raw TCP bytes and, after any handshake, the plaintext
        self.handshakes = 0
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(3)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while data := tls.recv(65536):
                        self.received += data
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.sock.close()


def test_census_over_tls_with_a_private_ca_and_client_certificate_and_a_mitm_gets_nothing(
    workers: list[Worker], control: Control, ctlapp: Path, tmp_path: Path
) -> None:
    password = "s3cret-" + uuid.uuid4().hex
    server = TlsRedis(tmp_path / "tls", password)
    mitm = ManInTheMiddle(tmp_path / "tls")
    earlier = set(CERTIFICATE_FILES.files())
    try:
        tls_env = {"ssl_ca_certs": str(server.dir / "ca.crt"), "ssl_certfile": str(server.dir / "client.crt"),
                   "ssl_keyfile": str(server.dir / "client.key")}  # fmt: skip
        workers.append(Worker(server.url, "tls-0", "work", tmp_path, app="ctlapp", path=ctlapp,
                              CTL_TLS=json.dumps(tls_env)))  # fmt: skip
        target = ControlTarget(server.url, tls=server.tls_settings())
        wait_for(lambda: _answers(control, target, ["tls-0"]), timeout=60,
                 message=lambda: f"the TLS worker answers; log:\n{workers[0].log.read_text()[-2000:]}")  # fmt: skip
        assert control.census(target, ["tls-0"])["tls-0"].queues == {"work"}
        # One certificate pair on disk for the one client certificate, however many clients use it.
        assert len(set(CERTIFICATE_FILES.files()) - earlier) == 2

        # The same pool's settings pointed at an impostor: refused before any password is sent.
        impostor = ControlTarget(f"rediss://:{password}@127.0.0.1:{mitm.port}/0", tls=server.tls_settings())
        with pytest.raises(ControlError, match="certificate verify failed") as refused:
            control.census(impostor, ["tls-0"])
        assert password not in str(refused.value)
        wait_for(lambda: mitm.connections >= 1, timeout=5, message="the client reached the impostor")
        assert mitm.handshakes == 0
        assert password.encode() not in mitm.received
    finally:
        mitm.close()
        server.stop()
    control.run(control.client.aclose())
    assert set(CERTIFICATE_FILES.files()) - earlier == set()  # removed when the last client closed


# -- hostile workers -------------------------------------------------------------------------------


# A hostile worker in its own process (its allocations stay out of the operator's measurements):
# it answers every request naming NODE on the pidbox channel, as MODE says.
FAKE_WORKER = """
import base64, json, sys, uuid
import redis
port, node, mode, channel = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
client = redis.Redis(port=port)
client.sadd("_kombu.binding.celery.pidbox", "\\x06\\x16\\x06\\x16" + node + ".celery.pidbox")
pubsub = client.pubsub()
pubsub.psubscribe(channel)
huge = base64.b64encode(json.dumps({node: ["x"] * (9 * 1024 * 1024 // 6)}).encode()).decode()
foreign = json.dumps({"headers": {"ticket": str(uuid.uuid4())}, "content-type": "application/json",
                      "properties": {}, "body": "A" * 20_000})
print("ready", flush=True)
for msg in pubsub.listen():
    if msg["type"] != "pmessage":
        continue
    body = json.loads(base64.b64decode(json.loads(msg["data"])["body"]))
    if node not in body["destination"]:
        continue
    queues = [{"name": "work"}] if body["method"] == "active_queues" else []
    value = huge if mode == "huge" else base64.b64encode(json.dumps({node: queues}).encode()).decode()
    reply_list = body["reply_to"]["routing_key"] + ".reply.celery.pidbox"
    if mode == "chatty":
        for _ in range(20):
            client.lpush(reply_list, foreign)
    head = json.dumps({
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"ticket": body["ticket"], "clock": 1},
        "properties": {"body_encoding": "base64", "delivery_tag": "t", "delivery_info": {}},
    })
    client.lpush(reply_list, head[:-1] + ', "body": "' + value + '"}')
    client.incr("fake:replied:" + node)
"""


@pytest.fixture
def fake_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    started: list[subprocess.Popen[str]] = []

    def start(node: str, mode: str, port: int | None = None, channel: str = "/0.celery.pidbox") -> None:
        argv = [sys.executable, str(script), str(port or redis_server.port), node, mode, channel]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Cost:
    peak: int  # tracemalloc peak, bytes
    rss_growth: int  # KiB
    took: float  # seconds
    lag: float  # the event loop's worst lag during the census, seconds (a 10 ms ticker)


def _measured(control: Control, url: str, pods: list[str], timeout: float) -> tuple[dict[str, WorkerReport], Cost]:
    """The census and what it cost the operator's process and event loop."""

    async def probed() -> tuple[dict[str, WorkerReport], float]:
        lag, done = 0.0, asyncio.Event()

        async def ticker() -> None:
            nonlocal lag
            while not done.is_set():
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - t - 0.01)

        tick = asyncio.create_task(ticker())
        try:
            return await control.client.census(ControlTarget(url), pods, deadline=time.monotonic() + timeout), lag
        finally:
            done.set()
            await tick

    rss = _rss_kb()
    tracemalloc.start()
    started = time.monotonic()
    try:
        result, lag = control.run(probed())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, Cost(peak, _rss_kb() - rss, time.monotonic() - started, lag)


def test_a_9mb_reply_is_dropped_unread_and_replies_for_other_tickets_are_not_kept(
    redis_server: RedisServer, redis_db: Any, control: Control, fake_worker: Any
) -> None:
    fake_worker("celery@huge-0", "huge")
    fake_worker("celery@chatty-1", "chatty")
    census, cost = _measured(control, redis_server.url, ["huge-0"], timeout=3.0)
    print(f"\n9 MB replies x4: tracemalloc peak {cost.peak / 1024:.0f} KiB, RSS growth {cost.rss_growth} KiB, "
          f"loop lag max {cost.lag * 1000:.0f} ms, census {cost.took:.2f}s, "
          f"dropped {control.client.dropped}")  # fmt: skip
    wait_for(lambda: redis_db.get("fake:replied:celery@huge-0") == b"4", timeout=30,
             message="the fake worker answered all four calls")  # fmt: skip
    # Dropped unread: counted as silent with remote control (busy), never idle.
    assert (census["huge-0"].answered, census["huge-0"].busy) == (False, True)
    assert control.client.dropped >= 1
    assert cost.peak < 1024 * 1024 and cost.rss_growth < 20 * 1024 and cost.lag < 0.1

    # 20 replies of 20 KB for another ticket before each real one: dropped in Redis, never read or counted.
    census, cost = _measured(control, redis_server.url, ["chatty-1"], timeout=3.0)
    print(f"80 x 20 KB foreign replies: tracemalloc peak {cost.peak / 1024:.0f} KiB, RSS growth "
          f"{cost.rss_growth} KiB, loop lag max {cost.lag * 1000:.0f} ms, census {cost.took:.2f}s")  # fmt: skip
    assert census["chatty-1"].answered and census["chatty-1"].queues == {"work"}
    assert cost.peak < 1024 * 1024 and cost.rss_growth < 20 * 1024 and cost.lag < 0.1
    # A reply pushed after its request ended re-creates that list: the next request deletes it again.
    assert control.census(redis_server.url, ["chatty-1"])["chatty-1"].answered
    assert _no_control_keys(redis_db) == []  # nothing kept for other tickets


def test_the_pop_script_returns_only_what_fits_and_names_our_ticket(redis_db: Any) -> None:
    """Over the per-reply budget: its length; no ticket of ours: minus its length; over what is
    left of the request: its length; everything popped either way (nothing stays in the list)."""
    small, other, big = b'{"t": "tk-1", "x": 1}', b'{"t": "tk-other"}', b'{"t": "tk-2", "pad": "' + b"y" * 900 + b'"}'
    for raw in (small, other, big, small):  # RPOP takes them in push order
        redis_db.lpush("r.reply.celery.pidbox", raw)
    got = redis_db.eval(POP_SCRIPT, 1, "r.reply.celery.pidbox", 500, 30, 10, 4096, "tk-1", "tk-2")
    assert got == [small, -len(other), len(big), len(small)]  # the second `small` is past the 30 bytes left
    assert redis_db.exists("r.reply.celery.pidbox") == 0
    # A list over the cap is deleted before anything is copied out of it: only its size comes back.
    redis_db.lpush("r.reply.celery.pidbox", small, b"z" * 5000)
    [size] = redis_db.eval(POP_SCRIPT, 1, "r.reply.celery.pidbox", 500, 30, 10, 4096, "tk-1")
    assert size > 5000 and redis_db.exists("r.reply.celery.pidbox") == 0


def test_a_million_member_pidbox_table_costs_nothing_extra(
    redis_server: RedisServer, redis_db: Any, control: Control
) -> None:
    mailbox = Mailbox()
    pipe = redis_db.pipeline(transaction=False)
    for i in range(1_000_000):
        pipe.sadd(mailbox.node_table, mailbox.node_member(f"celery@other-{i}"))
        if i % 50_000 == 0:
            pipe.execute()
    pipe.sadd(mailbox.node_table, mailbox.node_member("celery@stuck-0"))
    pipe.execute()
    assert redis_db.scard(mailbox.node_table) == 1_000_001
    census, cost = _measured(control, redis_server.url, ["stuck-0", "gone-1"], timeout=1.0)
    print(f"\n1 M-member pidbox table: tracemalloc peak {cost.peak / 1024:.0f} KiB, RSS growth {cost.rss_growth} KiB, "
          f"loop lag max {cost.lag * 1000:.0f} ms, census {cost.took:.2f}s")  # fmt: skip
    assert (census["stuck-0"].answered, census["stuck-0"].remote_control, census["stuck-0"].busy) == (False, True, True)
    assert (census["gone-1"].remote_control, census["gone-1"].busy) == (False, False)
    assert cost.peak < 512 * 1024 and cost.took < 1.2 and cost.lag < 0.1


def test_broker_down_mid_census_is_a_control_error(redis_server: RedisServer, redis_db: Any, control: Control) -> None:
    mailbox = Mailbox()
    redis_db.sadd(mailbox.node_table, mailbox.node_member("celery@stuck-0"))  # bound, silent: the census waits
    stopper = threading.Timer(0.3, redis_server.stop)
    stopper.start()
    try:
        with pytest.raises(ControlError) as err:
            control.census(redis_server.url, ["stuck-0"], timeout=3.0)
    finally:
        stopper.join()
        redis_server.start()
    assert redis_server.password is None or redis_server.password not in str(err.value)


def test_the_control_acl_is_enough(
    redis_server: RedisServer, redis_db: Any, control: Control, fake_worker: Any
) -> None:
    """docs/install.md's control user (CONTROL_ACL, nothing more) can run a whole census."""
    password = uuid.uuid4().hex
    redis_db.execute_command("ACL", "SETUSER", "fleet-control", *CONTROL_ACL.split(), f">{password}")
    fake_worker("celery@fake-0", "plain")
    mailbox = Mailbox()
    redis_db.sadd(mailbox.node_table, mailbox.node_member("celery@stuck-1"))
    url = f"redis://fleet-control:{password}@{redis_server.host}:{redis_server.port}/0"
    census = control.census(url, ["fake-0", "stuck-1", "gone-2"], timeout=1.0)
    assert census["fake-0"].answered and census["fake-0"].queues == {"work"}
    assert (census["stuck-1"].remote_control, census["gone-2"].remote_control) == (True, False)
    assert _no_control_keys(redis_db) == []
    # And no more: the queues are not the control user's to read.
    user = redis.Redis(host=redis_server.host, port=redis_server.port, username="fleet-control", password=password)
    with user, pytest.raises(redis.exceptions.NoPermissionError):
        user.llen("celery")


def test_census_over_sentinel_reaches_current_and_pre_5_4_workers(
    tmp_path: Path, workers: list[Worker], control: Control, ctlapp: Path, fake_worker: Any
) -> None:
    """A real worker on Sentinel (kombu as installed: topic ``/0.celery.pidbox``) and one that
    listens as kombu < 5.4 did on Sentinel (the literal ``/{db}.celery.pidbox``) both answer."""
    from tests.integration.test_broker_kombu_parity import SentinelSet

    sentinels = SentinelSet(tmp_path / "sentinel")
    try:
        wait_for(lambda: sentinels.master_port() == sentinels.master.port, timeout=20,
                 message="the Sentinels to know the master")  # fmt: skip
        workers.append(Worker(sentinels.url, "sent-0", "work", tmp_path, app="ctlapp", path=ctlapp,
                              CTL_TRANSPORT=json.dumps({"master_name": "mymaster"})))  # fmt: skip
        fake_worker("celery@legacy-1", "plain", port=sentinels.master.port, channel="/{db}.celery.pidbox")
        target = ControlTarget(sentinels.url, master_name="mymaster")
        census = wait_for(lambda: (c := control.census(target, ["sent-0", "legacy-1"])) and
                          all(r.answered for r in c.values()) and c, timeout=60,
                          message=lambda: f"both answer; log:\n{workers[0].log.read_text()[-2000:]}")  # fmt: skip
        assert census["sent-0"].queues == {"work"} and census["legacy-1"].queues == {"work"}
    finally:
        sentinels.stop()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_censuses_of_many_pools_run_concurrently_and_clients_are_bounded(
    redis_server: RedisServer, redis_db: Any
) -> None:
    """Twelve pools on one broker, each with one silent worker, asked at once: all end at the one
    deadline, not one after another; 40 targets through an LRU of 8 leave no fd behind."""
    control = Control()
    control.client.max_brokers = 8
    try:
        mailbox = Mailbox()
        for i in range(12):
            redis_db.sadd(mailbox.node_table, mailbox.node_member(f"celery@stuck-{i}"))

        async def all_at_once() -> list[dict[str, WorkerReport]]:
            deadline = time.monotonic() + 1.0
            target = ControlTarget(redis_server.url)
            return await asyncio.gather(
                *(control.client.census(target, [f"stuck-{i}"], deadline=deadline) for i in range(12))
            )

        started = time.monotonic()
        reports = control.run(all_at_once())
        took = time.monotonic() - started
        print(f"\n12 censuses with a silent worker each, at once: {took:.2f}s")
        assert took < 1.3
        assert all(r[f"stuck-{i}"].busy and r[f"stuck-{i}"].remote_control for i, r in enumerate(reports))

        before = _open_fds()
        for i in range(40):
            control.census(ControlTarget(redis_server.url, f"other-{i}:"), ["nobody"], timeout=0.3)
        assert control.client.open_brokers() == 8
        print(f"40 targets through an LRU of 8: open fds {before} -> {_open_fds()}")
        assert _open_fds() - before <= 8 * 2
    finally:
        control.close()


def test_the_operators_worker_arguments_with_shutdown_options_run_a_real_worker(
    redis_server: RedisServer, redis_db: Any, workers: list[Worker], tmp_path: Path
) -> None:
    from celery_fleet.api.models import parse_pool
    from celery_fleet.planning.workload import worker_args

    spec = parse_pool({"app": "plainapp", "image": "i", "broker": {"url": "redis://r"}, "tiers": [
        {"name": "work", "queues": ["work"], "concurrency": 1, "replicas": {"min": 0, "max": 2},
         "disablePrefetch": True, "shutdown": {"softShutdownTimeoutSeconds": 7, "softShutdownOnIdle": True}},
    ]})  # fmt: skip
    argv = [a.replace("$(POD_NAME)", "args-0") for a in worker_args("plainapp", spec.tiers[0])]
    workers.append(Worker(redis_server.url, "args-0", "work", tmp_path, argv=argv))
    _producer(redis_server.url).send_task("plainapp.hold", args=[0.1], queue="work")
    wait_for(lambda: redis_db.llen("plain:done") == 1, timeout=60,
             message=lambda: f"a task done; worker log:\n{workers[0].log.read_text()[-2000:]}")  # fmt: skip
    stats = _producer(redis_server.url).control.inspect(destination=["celery@args-0"], timeout=5).conf()
    conf = stats["celery@args-0"]
    assert conf["worker_soft_shutdown_timeout"] == 7.0
    assert conf["worker_enable_soft_shutdown_on_idle"] is True
    assert conf["worker_disable_prefetch"] is True
