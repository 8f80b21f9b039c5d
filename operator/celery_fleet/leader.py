"""`celery-fleet elect` and `celery-fleet run --leader-elect`: the Lease elector run in-process.

The elector reads no kubeconfig (it must stand alone in a user's image). Here, where the
Kubernetes client is at hand, the kubeconfig (or in-cluster config) is resolved with it and the
elector gets the server, the CA file, a client certificate's files or a token source.

`run --leader-elect` runs the operator as the elector's command: only the Lease holder acts. This
process also serves the health endpoint the probes read, so a standby (which runs no operator)
answers healthy instead of being restarted by its liveness probe; while leading, it answers what
the operator's own (Kopf's) endpoint answers, on an internal loopback port. It serves /metrics the
same way: on every replica its own process metrics and the leader gauge (controller-runtime's
`leader_election_master_status`), so a standby is a scrape target that is up (kube-prometheus'
TargetDown counts it), plus the operator's metrics while it leads.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, ProcessCollector, generate_latest

from celery_fleet.elector import SERVICE_ACCOUNT_DIR
from celery_fleet.elector import cli as elector_cli
from celery_fleet.elector.election import UsageError
from celery_fleet.elector.lease_client import ApiEndpoint, HttpLeaseApi
from celery_fleet.elector.loop import Elector
from celery_fleet.elector.process import UNKILLABLE_AFTER_SECONDS

# While the operator starts (imports, Kopf's login), its endpoint may refuse connections.
OPERATOR_STARTUP_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 3.0
# The operator's own exposition, read back over loopback: bounded all the same (1000 pools: a few MB).
OPERATOR_METRICS_LIMIT = 32 << 20


def endpoint_from_kubeconfig(kubeconfig: str | None, context: str | None) -> tuple[ApiEndpoint, str | None]:
    """The apiserver as the Kubernetes client resolves it: in-cluster, else the kubeconfig."""
    from celery_fleet.kube.client import load_api_client

    cfg = load_api_client(kubeconfig, context).configuration
    if cfg.username or cfg.password:
        raise UsageError("kubeconfig: basic auth (username/password) is not supported; use a token or certificate")

    def token() -> str | None:
        value = cfg.get_api_key_with_prefix("authorization")  # refreshes exec/OIDC tokens when due
        return str(value).removeprefix("Bearer ").strip() if value else None

    endpoint = ApiEndpoint(
        server=str(cfg.host),
        ca_file=cfg.ssl_ca_cert,
        client_cert_file=cfg.cert_file,
        client_key_file=cfg.key_file,
        token_source=token,
        insecure=not cfg.verify_ssl,
        tls_server_name=getattr(cfg, "tls_server_name", None),
    )
    return endpoint, _configured_namespace(kubeconfig, context)


def _configured_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    """The namespace the configuration names: the service account's in a pod, else the context's."""
    from kubernetes import config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            with open(os.path.join(SERVICE_ACCOUNT_DIR, "namespace"), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


def elect_parser() -> argparse.ArgumentParser:
    parser = elector_cli.build_parser(prog="celery-fleet elect")
    kube = parser.add_argument_group("kubeconfig (resolved by the Kubernetes client when --server is not given)")
    kube.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then $KUBECONFIG, ~/.kube/config)")
    kube.add_argument("--context", help="kubeconfig context (default: current-context)")
    return parser


def _resolve(args: argparse.Namespace) -> tuple[ApiEndpoint, str | None]:
    return endpoint_from_kubeconfig(args.kubeconfig or os.environ.get("KUBECONFIG"), args.context)


def elect_main(argv: Sequence[str]) -> int:
    """`celery-fleet elect [--kubeconfig F] --lease NAME ... -- CMD`."""
    return elector_cli.main(list(argv), parser=elect_parser(), resolve_endpoint=_resolve)


# --------------------------------------------------------------------------- run --leader-elect

ELECTION_FLAGS = frozenset(
    {"--lease-name", "--lease-namespace", "--identity", "--lease-duration", "--renew-deadline", "--retry-period"}
)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_argv(argv: Sequence[str], health_endpoint: str, metrics_port: int = 0) -> list[str]:
    """The operator's own command: `run` without the election flags, its health and metrics endpoints
    internal (on loopback; this process serves the public ones)."""
    child: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if arg == "--leader-elect":
            continue
        if name in ELECTION_FLAGS or name in ("--health-endpoint", "--metrics-port", "--metrics-addr"):
            skip = "=" not in arg
            continue
        child.append(arg)
    internal = [f"--health-endpoint={health_endpoint}", f"--metrics-port={metrics_port}", "--metrics-addr=127.0.0.1"]
    return [sys.executable, "-m", "celery_fleet.cli", *child, *internal]


class ElectedHealth:
    """The probes' endpoint for a replica under the elector.

    Healthy while the elector's loop keeps turning; while the operator runs, whatever the
    operator's own endpoint says (after a start-up grace). A standby is healthy: it is waiting,
    not broken.
    """

    def __init__(self, operator_url: str, stall_after: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.operator_url = operator_url
        self.stall_after = stall_after
        self.monotonic = monotonic
        self.elector: Elector | None = None
        self._running_since: float | None = None

    def answer(self) -> tuple[int, str]:
        elector = self.elector
        if elector is None:
            return 200, "starting"
        now = self.monotonic()
        if now - elector.turned_at > self.stall_after:
            return 500, f"elector loop stalled for {now - elector.turned_at:.0f}s"
        if not elector.running:
            self._running_since = None
            return 200, f"standby (lease held by {elector.election.holder() or 'nobody'})"
        if self._running_since is None:
            self._running_since = now
        try:
            with urllib.request.urlopen(self.operator_url, timeout=PROBE_TIMEOUT_SECONDS) as reply:
                return int(reply.status), "leading: " + reply.read(512).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), "leading: the operator reports unhealthy"
        except OSError as exc:
            if now - self._running_since < OPERATOR_STARTUP_SECONDS:
                return 200, "leading: the operator is starting"
            return 500, f"leading: the operator does not answer its health endpoint: {exc}"

    def serve(self, url: str) -> http.server.ThreadingHTTPServer:
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/"
        health = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, text = health.answer() if self.path.split("?")[0] == path else (404, "not found")
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Probes every few seconds are not news."""

        server = http.server.ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="elected-health", daemon=True).start()
        return server


class ElectedMetrics:
    """The /metrics of a replica under the elector: this process's metrics and the leader gauge on
    every replica; while leading, the operator's own metrics (read from its loopback port) after them."""

    def __init__(self, operator_url: str, lease: str, leading: Callable[[], bool]) -> None:
        self.operator_url = operator_url
        self.leading = leading
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._leader = Gauge(
            "leader_election_master_status",
            "1 on the replica that holds the Lease and runs the operator, 0 on a standby (controller-runtime's name).",
            ["name"],
            registry=self.registry,
        ).labels(lease)

    def exposition(self) -> bytes:
        leading = self.leading()
        self._leader.set(1 if leading else 0)
        own = generate_latest(self.registry)
        if not leading:
            return own
        try:
            with urllib.request.urlopen(self.operator_url, timeout=PROBE_TIMEOUT_SECONDS) as reply:
                body: bytes = reply.read(OPERATOR_METRICS_LIMIT + 1)
        except OSError:
            return own  # starting or stopping: the gauge still says who leads
        if len(body) > OPERATOR_METRICS_LIMIT:
            sys.stderr.write(f"elector: operator metrics over {OPERATOR_METRICS_LIMIT} bytes, left out\n")
            return own
        return own + body

    def serve(self, addr: str, port: int) -> http.server.ThreadingHTTPServer:
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path.split("?")[0] in ("/metrics", "/")
                body = metrics.exposition() if found else b"not found"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST if found else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes every few seconds are not news."""

        server = http.server.ThreadingHTTPServer((addr, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="elected-metrics", daemon=True).start()
        return server


def run_elected(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`run --leader-elect`: the operator as the elector's command, so only the Lease holder acts.

    The elector stops the operator once it has failed to renew for the renew deadline, which is
    shorter than the lease duration, so a cut-off replica has stopped before a standby starts.
    """
    internal = f"http://127.0.0.1:{_free_loopback_port()}/healthz"
    metrics_port = _free_loopback_port() if args.metrics_port else 0
    elect = ["--namespace", args.lease_namespace, "--lease", args.lease_name]
    elect += ["--duration", str(args.lease_duration), "--renew-deadline", str(args.renew_deadline)]
    elect += ["--retry-period", str(args.retry_period)]
    if args.identity:
        elect += ["--identity", args.identity]
    parser = elect_parser()
    try:
        invocation = elector_cli.parse_invocation(
            [*elect, "--", *operator_argv(argv, internal if args.health_endpoint else "", metrics_port)],
            os.environ,
            parser,
            lambda _: endpoint_from_kubeconfig(args.kubeconfig, None),
        )
        api = HttpLeaseApi(invocation.endpoint, invocation.namespace, invocation.lease)
    except (UsageError, OSError) as exc:
        sys.stderr.write(f"elector: {exc}\n")
        return elector_cli.EXIT_USAGE
    timings = invocation.timings
    health = ElectedHealth(
        internal, stall_after=timings.duration + timings.stop_grace + UNKILLABLE_AFTER_SECONDS + timings.retry_period
    )
    server = health.serve(args.health_endpoint) if args.health_endpoint else None
    metrics_server = None
    if args.metrics_port:
        metrics = ElectedMetrics(
            f"http://127.0.0.1:{metrics_port}/metrics",
            invocation.lease,
            lambda: health.elector is not None and health.elector.running,
        )
        metrics_server = metrics.serve(args.metrics_addr, args.metrics_port)
    try:
        return elector_cli.run(invocation, api, on_elector=lambda e: setattr(health, "elector", e))
    finally:
        for running in (server, metrics_server):
            if running is not None:
                running.shutdown()
