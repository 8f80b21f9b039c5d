"""`run --leader-elect`: the operator's command line under the elector, and the probes' answers."""

from __future__ import annotations

import http.server
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_fleet import leader
from celery_fleet.elector.process import ThreadFence
from celery_fleet.leader import OPERATOR_STARTUP_SECONDS, ElectedHealth, ElectedMetrics, operator_argv


def test_the_operators_command_drops_the_election_flags_and_gets_the_internal_health_endpoint() -> None:
    argv = [
        "run", "--leader-elect", "--namespace", "shop", "--lease-name", "op", "--lease-namespace=fleet",
        "--identity", "pod-a", "--lease-duration", "4", "--renew-deadline=3", "--retry-period", "0.5",
        "--health-endpoint", "http://0.0.0.0:8080/healthz", "--metrics-port=8000",
    ]  # fmt: skip
    assert operator_argv(argv, "http://127.0.0.1:4321/healthz", 4322) == [
        sys.executable, "-m", "celery_fleet.cli", "run", "--namespace", "shop",
        "--health-endpoint=http://127.0.0.1:4321/healthz", "--metrics-port=4322", "--metrics-addr=127.0.0.1",
    ]  # fmt: skip


class MetricsEndpoint:
    """The operator's own /metrics on loopback, answering `body`."""

    def __init__(self, body: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


OPERATOR_METRICS = b"# TYPE celery_fleet_pools gauge\ncelery_fleet_pools 3.0\n"


@pytest.mark.parametrize(
    ("leading", "gauge", "operator_metrics"),
    [
        pytest.param(False, 0.0, False, id="standby-serves-its-own-metrics-and-leader-0"),
        pytest.param(True, 1.0, True, id="leader-adds-the-operators-metrics-and-leader-1"),
    ],
)
def test_every_replica_serves_metrics_with_a_leader_gauge(leading: bool, gauge: float, operator_metrics: bool) -> None:
    operator = MetricsEndpoint(OPERATOR_METRICS)
    metrics = ElectedMetrics(operator.url, "celery-fleet-operator", lambda: leading)
    server = metrics.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}  # the whole text parses
        (sample,) = families["leader_election_master_status"].samples
        assert (sample.labels, sample.value) == ({"name": "celery-fleet-operator"}, gauge)
        assert "process_resident_memory_bytes" in families or "process_cpu_seconds" in families
        assert ("celery_fleet_pools" in families) is operator_metrics
    finally:
        server.shutdown()
        operator.server.shutdown()


def test_a_leader_whose_operator_does_not_answer_still_serves_the_gauge() -> None:
    metrics = ElectedMetrics("http://127.0.0.1:1/metrics", "op", lambda: True)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["leader_election_master_status"].samples[0].value == 1.0


def test_an_oversized_operator_exposition_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader, "OPERATOR_METRICS_LIMIT", len(OPERATOR_METRICS) - 1)
    operator = MetricsEndpoint(OPERATOR_METRICS)
    try:
        text = ElectedMetrics(operator.url, "op", lambda: True).exposition().decode()
    finally:
        operator.server.shutdown()
    assert "leader_election_master_status" in text and "celery_fleet_pools" not in text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _elector(running: bool, turned_at: float, holder: str = "pod-b") -> Any:
    return SimpleNamespace(running=running, turned_at=turned_at, election=SimpleNamespace(holder=lambda: holder))


class OperatorEndpoint:
    """The operator's own (Kopf's) endpoint, answering `status`."""

    def __init__(self, status: int) -> None:
        answer = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(answer)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def healthy_operator() -> Iterator[OperatorEndpoint]:
    endpoint = OperatorEndpoint(200)
    yield endpoint
    endpoint.close()


@pytest.fixture
def sick_operator() -> Iterator[OperatorEndpoint]:
    endpoint = OperatorEndpoint(500)
    yield endpoint
    endpoint.close()


def test_a_standby_is_healthy() -> None:
    clock = Clock()
    health = ElectedHealth("http://127.0.0.1:1/healthz", stall_after=20, monotonic=clock)
    health.elector = _elector(running=False, turned_at=clock.now - 1)
    assert health.answer() == (200, "standby (lease held by pod-b)")


def test_a_stalled_elector_loop_is_not() -> None:
    clock = Clock()
    health = ElectedHealth("http://127.0.0.1:1/healthz", stall_after=20, monotonic=clock)
    health.elector = _elector(running=False, turned_at=clock.now - 21)
    status, text = health.answer()
    assert status == 500 and "stalled" in text


def test_a_leader_answers_what_its_operator_answers(
    healthy_operator: OperatorEndpoint, sick_operator: OperatorEndpoint
) -> None:
    clock = Clock()
    for endpoint, expected in ((healthy_operator, 200), (sick_operator, 500)):
        health = ElectedHealth(endpoint.url, stall_after=20, monotonic=clock)
        health.elector = _elector(running=True, turned_at=clock.now)
        assert health.answer()[0] == expected


def test_a_leader_whose_operator_does_not_answer_gets_a_start_up_grace_then_fails() -> None:
    clock = Clock()
    health = ElectedHealth("http://127.0.0.1:1/healthz", stall_after=20, monotonic=clock)
    health.elector = _elector(running=True, turned_at=clock.now)
    assert health.answer() == (200, "leading: the operator is starting")
    clock.now += OPERATOR_STARTUP_SECONDS + 1
    health.elector = _elector(running=True, turned_at=clock.now)
    status, text = health.answer()
    assert status == 500 and "does not answer" in text


# --- the real fence thread (the loop's tests use a fake on simulated time)


class RecordingCommand:
    def __init__(self) -> None:
        self.signals: list[int] = []
        self.killed = threading.Event()

    def start(self) -> int:
        return 1

    def poll(self) -> int | None:
        return None

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL:
            self.killed.set()


def test_the_fence_thread_stops_the_command_at_a_passed_deadline() -> None:
    command = RecordingCommand()
    woken = threading.Event()
    fence = ThreadFence(command, stop_grace=0.0, wake=woken.set, monotonic=lambda: 1000.0)
    fence.hold(999.0)  # already passed: nothing the loop does can delay it
    assert command.killed.wait(timeout=10), "the fence never fired"
    assert command.signals == [signal.SIGTERM, signal.SIGKILL]
    assert woken.is_set() and fence.fired()
    fence.release()
    assert not fence.fired()
