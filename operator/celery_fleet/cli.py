"""The `celery-fleet` command line: run the operator, elect a beat leader, print CRDs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from celery_fleet import __version__
from celery_fleet.metrics import DEFAULT_SERIES_PER_NAMESPACE, DEFAULT_SERIES_PER_POOL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-fleet", description="Kubernetes operator for Celery worker fleets.")
    parser.add_argument("--version", action="version", version=f"celery-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], metavar="NS", help="watch only NS (repeatable)"
    )
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: in-cluster, then KUBECONFIG")
    run.add_argument("--metrics-port", type=int, default=8000, help="Prometheus /metrics port (0: off)")
    run.add_argument("--metrics-addr", default="0.0.0.0", help="address the metrics server binds")
    run.add_argument(
        "--metrics-max-series-per-pool",
        type=int,
        default=DEFAULT_SERIES_PER_POOL,
        metavar="N",
        help="per-queue series a pool may have before new ones are left out and counted in "
        "celery_fleet_metric_series_dropped_total (0: no cap)",
    )
    run.add_argument(
        "--metrics-max-series-per-namespace",
        type=int,
        default=DEFAULT_SERIES_PER_NAMESPACE,
        metavar="N",
        help="series the pools of one namespace may have together (0: no cap)",
    )
    policy = run.add_argument_group(
        "broker destination policy (the operator connects to every broker a pool names; by default it refuses "
        "loopback, link-local, the unspecified address, its own pod and the apiserver)"
    )
    policy.add_argument(
        "--broker-allow",
        action="append",
        default=[],
        metavar="CIDR|HOST",
        help="allow brokers at these addresses (the most specific CIDR wins; allowing one lifts a default "
        "deny, e.g. 127.0.0.0/8 for local brokers) or host names (*.example.com; when any name is listed, "
        "only listed names); repeatable",
    )
    policy.add_argument(
        "--broker-deny",
        action="append",
        default=[],
        metavar="CIDR|HOST",
        help="refuse brokers at these addresses or host names (a deny wins a tie); repeatable",
    )
    policy.add_argument(
        "--own-address",
        action="append",
        default=[a for a in os.environ.get("POD_IPS", os.environ.get("POD_IP", "")).split(",") if a],
        metavar="IP",
        help="this pod's addresses, refused as brokers (default: $POD_IPS or $POD_IP)",
    )
    run.add_argument(
        "--health-endpoint",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint served by Kopf ('' disables)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between broker polls")
    run.add_argument("--workers", type=int, default=4, help="concurrent reconciles")
    run.add_argument(
        "--elector-image",
        default=os.environ.get("CELERY_FLEET_ELECTOR_IMAGE", f"ghcr.io/celery-fleet/celery-fleet:{__version__}"),
        help="image whose single-file elector is copied into beat pods",
    )
    election = run.add_argument_group(
        "leader election (several replicas, one active: the operator runs only while it holds a Lease)"
    )
    election.add_argument("--leader-elect", action="store_true", help="run the operator under the Lease elector")
    election.add_argument("--lease-name", default="celery-fleet-operator", help="Lease name")
    election.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    election.add_argument("--identity", default=None, help="holder identity (default: $POD_NAME, else the hostname)")
    election.add_argument("--lease-duration", type=int, default=15, help="leaseDurationSeconds")
    election.add_argument("--renew-deadline", type=float, default=10.0, help="stop if not renewed within this")
    election.add_argument("--retry-period", type=float, default=2.0, help="renew/poll interval")

    crds = sub.add_parser("crds", help="print the generated CRDs as YAML")
    crds.add_argument("--check", action="store_true", help="fail when crds/ is stale")

    sub.add_parser(
        "localrun",
        help="DEVELOPMENT ONLY: run real Celery processes for the local cluster's managed Deployments",
        add_help=False,
    )
    sub.add_parser(
        "elect",
        help="run a command only while holding a Kubernetes Lease (see `celery-fleet elect -h`)",
        add_help=False,
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        # Before importing the client: it reads KUBECONFIG once, at import time, and Kopf's
        # login (via that client) relies on it.
        os.environ["KUBECONFIG"] = args.kubeconfig
    # The operator talks to the apiserver through kube.login, never the official client; Kopf imports
    # that client (and pykube) when installed only to recognise their objects, which costs ~60 MiB of
    # resident model classes. Hidden here, Kopf takes them as absent (its documented fallback).
    for unused in ("kubernetes", "kubernetes_asyncio", "pykube"):
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]  # None in sys.modules: "not importable"
    import kopf

    from celery_fleet import logs, metrics
    from celery_fleet.brokers.destination import apiserver_addresses
    from celery_fleet.handlers import kopf_handlers  # noqa: F401  (registers the handlers)
    from celery_fleet.handlers.fleet import Fleet, FleetConfig
    from celery_fleet.kube.client import Kube, connect
    from celery_fleet.planning.broker_policy import BrokerPolicy, PolicyError

    try:  # refused before anything connects
        BrokerPolicy.build(args.broker_allow, args.broker_deny)
    except PolicyError as err:
        sys.stderr.write(f"celery-fleet run: --broker-allow/--broker-deny: {err}\n")
        return 2
    logs.configure(args.log_level, args.json_logs)
    transport = connect(args.kubeconfig, maxsize=args.workers * 2 + 8)
    kube = Kube(transport)
    policy = BrokerPolicy.build(
        args.broker_allow,
        args.broker_deny,
        own_addresses=args.own_address,
        apiserver_addresses=apiserver_addresses(transport.credentials.server),
    )
    metrics.SERIES_BUDGET.configure(args.metrics_max_series_per_pool, args.metrics_max_series_per_namespace)
    config = FleetConfig(
        poll_interval=args.poll_interval,
        reconcile_workers=args.workers,
        elector_image=args.elector_image,
        broker_policy=policy,
    )
    metrics.serve(args.metrics_port, args.metrics_addr)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,  # one active replica is the Lease's job (--leader-elect), not Kopf peering's
        liveness_endpoint=args.health_endpoint or None,
        memo=kopf.Memo(fleet=Fleet(kube=kube, config=config)),
    )
    return 0


def _localrun(argv: list[str]) -> int:
    # Development only, so it is not in the wheel or the image: `make install` puts the
    # checkout's dev/ on the virtualenv's path.
    try:
        import celery_fleet_localrun  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        sys.stderr.write("celery-fleet localrun is a development tool, not shipped: run it from a checkout\n")
        return 2
    return int(celery_fleet_localrun.main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "localrun":
        return _localrun(argv[1:])
    if argv and argv[0] == "elect":
        from celery_fleet import leader

        return leader.elect_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.leader_elect:
        from celery_fleet import leader

        return leader.run_elected(args, argv)
    if args.command == "run":
        return _run(args)
    if args.command == "crds":
        from celery_fleet.api import crdgen

        if args.check:
            return int(crdgen.main(["--check"]))
        import yaml

        sys.stdout.write(yaml.safe_dump_all(crdgen.generate_crds().values(), sort_keys=False))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
