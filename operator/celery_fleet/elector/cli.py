"""The elector's command line: `python3 elector.pyz --lease NAME [options] -- CMD [ARGS...]`.

In a pod the apiserver is found as client-go finds it in-cluster: KUBERNETES_SERVICE_HOST/PORT
and the mounted service account (`--service-account-dir`; its token is re-read on every request,
as it rotates). Elsewhere pass `--server` with `--ca-file`, `--token-file` or
`--client-cert/--client-key`, or run `celery-fleet elect`, which resolves a kubeconfig with the
Kubernetes client and hands the elector the result: the elector reads no kubeconfig itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery_fleet.elector import SERVICE_ACCOUNT_DIR
from celery_fleet.elector.election import Election, ElectionTimings, UsageError
from celery_fleet.elector.lease_client import ApiEndpoint, HttpLeaseApi
from celery_fleet.elector.loop import Elector
from celery_fleet.elector.process import (
    ChildProcess,
    Emit,
    Shutdown,
    SystemClock,
    ThreadFence,
    install_signal_handlers,
    stderr_log,
)
from celery_fleet.elector.schedule_state import STATE_ENV
from celery_fleet.elector.schedule_store import StoreConfig

EXIT_USAGE = 2
LEASE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

if TYPE_CHECKING:  # not at runtime: Python 3.8 cannot subscript these
    # Given the parsed flags: an endpoint and the namespace its configuration names (or None).
    ResolveEndpoint = Callable[[argparse.Namespace], tuple[ApiEndpoint, str | None]]


def build_parser(prog: str = "elector") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s --lease NAME [options] -- CMD [ARGS...]",
        description="Run CMD only while holding a coordination.k8s.io/v1 Lease (one Celery Beat, hot standby).",
    )
    election = parser.add_argument_group("election")
    election.add_argument("--lease", required=True, help="Lease name")
    election.add_argument("--namespace", help="Lease namespace (default: $POD_NAMESPACE, else the service account's)")
    election.add_argument("--identity", help="holder identity (default: $POD_NAME, else the hostname)")
    election.add_argument("--duration", type=int, default=15, help="leaseDurationSeconds (default 15)")
    election.add_argument(
        "--renew-deadline", type=float, default=10.0, help="stop CMD after failing to renew this long (default 10)"
    )
    election.add_argument("--retry-period", type=float, default=2.0, help="renew/poll interval (default 2)")
    election.add_argument(
        "--stop-grace", type=float, help="SIGKILL CMD this long after SIGTERM (default (duration - renew-deadline) / 2)"
    )
    election.add_argument(
        "--schedule-state",
        action="store_true",
        help="let CMD (celery beat with celery_fleet.beat.scheduler:LeaseScheduler) keep its schedule "
        "state on the lease: exports the lease and the credential file paths to it, and this file on its PYTHONPATH",
    )
    conn = parser.add_argument_group("apiserver (default: in-cluster)")
    conn.add_argument(
        "--service-account-dir",
        default=SERVICE_ACCOUNT_DIR,
        help=f"in-cluster credentials: token, ca.crt, namespace (default {SERVICE_ACCOUNT_DIR})",
    )
    conn.add_argument("--server", help="apiserver URL, instead of in-cluster")
    conn.add_argument("--ca-file", help="CA bundle to verify the apiserver (with --server)")
    conn.add_argument("--client-cert", help="client certificate (PEM file, with --server)")
    conn.add_argument("--client-key", help="client key (PEM file, with --server)")
    conn.add_argument("--token-file", help="bearer token file, re-read on every request (with --server)")
    conn.add_argument("--tls-server-name", help="name to verify the apiserver certificate against")
    conn.add_argument(
        "--insecure-skip-tls-verify", action="store_true", help="do not verify the apiserver (testing only)"
    )
    return parser


@dataclass
class Invocation:
    lease: str
    namespace: str
    identity: str
    timings: ElectionTimings
    endpoint: ApiEndpoint
    command: list[str]
    # The schedule state's configuration for CMD (--schedule-state), else None.
    schedule_state: StoreConfig | None = None


def in_cluster_endpoint(environ: Mapping[str, str], service_account_dir: str) -> ApiEndpoint:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    return ApiEndpoint(
        server=f"https://{host}:{port}",
        ca_file=os.path.join(service_account_dir, "ca.crt"),
        token_file=os.path.join(service_account_dir, "token"),
    )


def _explicit_endpoint(args: argparse.Namespace) -> ApiEndpoint:
    if args.client_key and not args.client_cert:
        raise UsageError("--client-key needs --client-cert")
    return ApiEndpoint(
        server=args.server,
        ca_file=args.ca_file,
        client_cert_file=args.client_cert,
        client_key_file=args.client_key,
        token_file=args.token_file,
        insecure=args.insecure_skip_tls_verify,
        tls_server_name=args.tls_server_name,
    )


def parse_invocation(
    argv: Sequence[str],
    environ: Mapping[str, str],
    parser: argparse.ArgumentParser | None = None,
    resolve_endpoint: ResolveEndpoint | None = None,
) -> Invocation:
    """The flags, checked. `resolve_endpoint` finds the apiserver when `--server` is not given
    (`celery-fleet elect` passes one built on the Kubernetes client); without it, in-cluster."""
    parser = parser or build_parser()
    args_list = list(argv)
    if "--" not in args_list and ("-h" in args_list or "--help" in args_list):
        parser.parse_args(["--help"])  # prints the usage and exits 0
    if "--" not in args_list:
        raise UsageError("missing `-- CMD [ARGS...]`: put the command to run after `--`")
    split = args_list.index("--")
    options, command = args_list[:split], args_list[split + 1 :]
    if not command:
        raise UsageError("nothing after `--`: give the command to run, e.g. `-- celery -A app beat`")
    args = parser.parse_args(options)

    if not LEASE_NAME_RE.match(args.lease) or len(args.lease) > 253:
        raise UsageError(f"--lease {args.lease!r}: must be a DNS subdomain (lowercase letters, digits, '-', '.')")
    identity = args.identity or environ.get("POD_NAME") or socket.gethostname()
    if not identity:
        raise UsageError("--identity is empty: pass --identity or set POD_NAME")
    stop_grace = args.stop_grace
    if stop_grace is None:
        stop_grace = max(0.0, (args.duration - args.renew_deadline) / 2)
    timings = ElectionTimings(args.duration, args.renew_deadline, args.retry_period, stop_grace)
    timings.validate()

    configured_namespace: str | None = None
    if args.server:
        endpoint = _explicit_endpoint(args)
    elif resolve_endpoint is not None:
        endpoint, configured_namespace = resolve_endpoint(args)
    elif environ.get("KUBERNETES_SERVICE_HOST"):
        endpoint = in_cluster_endpoint(environ, args.service_account_dir)
        try:
            with open(os.path.join(args.service_account_dir, "namespace"), encoding="utf-8") as handle:
                configured_namespace = handle.read().strip() or None
        except OSError:
            configured_namespace = None
    else:
        raise UsageError(
            "no apiserver to talk to: not in a pod (KUBERNETES_SERVICE_HOST unset) and no --server; "
            "outside a cluster run `celery-fleet elect`, which reads your kubeconfig"
        )
    namespace = args.namespace or environ.get("POD_NAMESPACE") or configured_namespace
    if not namespace:
        raise UsageError("no namespace for the lease: pass --namespace or set POD_NAMESPACE")
    if shutil.which(command[0]) is None:
        raise UsageError(f"command {command[0]!r} not found on PATH")
    state = StoreConfig.for_endpoint(endpoint, namespace, args.lease, identity) if args.schedule_state else None
    return Invocation(args.lease, namespace, identity, timings, endpoint, command, state)


def bundle_root() -> str:
    """What to put on PYTHONPATH for `celery_fleet` as this process has it: the single file when
    run from it (.../elector.pyz/celery_fleet/elector/cli.py), else the source tree."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command_environment(invocation: Invocation, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The command's environment: ours, plus the schedule state's with --schedule-state (None: ours)."""
    if invocation.schedule_state is None:
        return None
    env = dict(environ)
    # Appended: a `celery_fleet` the image already has (a development install) stays first.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (environ.get("PYTHONPATH"), bundle_root()) if p)
    env[STATE_ENV] = invocation.schedule_state.to_env()
    return env


def run(invocation: Invocation, api: HttpLeaseApi, on_elector: Callable[[Elector], None] | None = None) -> int:
    """Elect and supervise until shutdown or the command's exit; returns the exit status."""
    clock = SystemClock()
    shutdown = Shutdown()
    install_signal_handlers(shutdown)
    emit: Emit = stderr_log(
        {"lease": f"{invocation.namespace}/{invocation.lease}", "identity": invocation.identity}, clock.wall
    )
    timings = invocation.timings
    emit(
        "starting",
        server=invocation.endpoint.server,
        duration=timings.duration,
        renew_deadline=f"{timings.renew_deadline:g}",
        retry_period=f"{timings.retry_period:g}",
        stop_grace=f"{timings.stop_grace:g}",
    )
    command = ChildProcess(invocation.command, command_environment(invocation, os.environ))
    fence = ThreadFence(command, timings.stop_grace, clock.wake)
    elector = Elector(Election(invocation.identity, timings), api, command, clock, shutdown, emit, fence)
    if on_elector is not None:
        on_elector(elector)
    return elector.run()


def main(
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    resolve_endpoint: ResolveEndpoint | None = None,
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        invocation = parse_invocation(argv, os.environ, parser, resolve_endpoint)
        api = HttpLeaseApi(invocation.endpoint, invocation.namespace, invocation.lease)
    except (UsageError, OSError) as exc:  # OSError: a CA or client certificate that cannot be loaded
        sys.stderr.write(f"elector: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # argparse has printed the usage or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(invocation, api)
