"""Desired worker objects of a CeleryWorkerPool: one Deployment (and optional PDB) per tier. (pure)

Everything here maps models to plain manifests; the handlers apply them with server-side apply
under one field manager and never read them back.

`spec.replicas` has one writer, the autoscaler (``planning.scaling`` already brings a new tier
to ``replicas.min`` and clamps to the bounds). So the manifests leave it out by default: with
server-side apply, a field manager that once applied ``spec.replicas`` and later omits it
*removes* it (the Deployment falls back to 1 replica) unless another manager took it over.
Write replicas through the scale subresource (or a separate field manager) instead.

Probes: a worker is run in exec form, so Celery's main process is PID 1 and the kubelet restarts
the container when it dies; a liveness probe that checked "the process is alive" would add
nothing. Celery 5 has no local health endpoint, and anything that proves more (``celery inspect
ping``) is a broadcast through the broker to every worker, the load we promise not to add. So
there is no liveness probe. Readiness is local and free for the broker: the pod is ready once its
network namespace holds an established TCP connection to the broker's port (read from
``/proc/net/tcp*``), which is what a rolling update needs to know before it stops an old worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from celery_fleet.api.broker_url import DEFAULT_PORTS
from celery_fleet.api.models import (
    API_VERSION,
    BROKER_SECRET_URL_ENV,
    BROKER_TLS_DIR,
    BROKER_TLS_VOLUME,
    BROKER_URL_ENV,
    GROUP,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POOL_KIND,
    POOL_LABEL,
    TIER_LABEL,
    WORKER_CONTAINER,
    Broker,
    BrokerTls,
    CeleryWorkerPoolSpec,
    Monitoring,
    Tier,
    WorkloadSpec,
)
from celery_fleet.planning.overlay import merge
from celery_fleet.planning.scale_in import hostname as node_name

Manifest = dict[str, Any]

MANAGED_BY = "celery-fleet"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# Re-exported: declared in api.models, whose overlay rules name them.
__all__ = ["POOL_LABEL", "TIER_LABEL", "WORKER_CONTAINER"]
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"

REMAP_SIGTERM_ENV = "REMAP_SIGTERM"  # billiard: which signal SIGTERM acts as
# spec.broker.tls files in worker and beat pods (kombu reads their paths from the URL query).
BROKER_TLS_CA, BROKER_TLS_CERT, BROKER_TLS_KEY = "ca.crt", "tls.crt", "tls.key"

# A warm shutdown (SIGTERM) lets running tasks finish; the margin covers the worker's own
# shutdown (acks, closing the pool) after the last task hits its time limit.
GRACE_MARGIN_SECONDS = 30
# Without a task time limit we cannot know how long tasks run; five minutes covers typical
# background work while keeping node drains bounded. Set the tier's value for longer tasks.
DEFAULT_GRACE_SECONDS = 300

# worker_disable_prefetch (Celery 5.6+) as a command-line setting, not the --disable-prefetch flag:
# an older worker exits on an unknown flag, but an unknown setting is only stored. The `(bool)` cast
# is what makes it unknown-safe: without it Celery looks the name up in its defaults (KeyError).
DISABLE_PREFETCH_SETTING = "worker_disable_prefetch=(bool)true"

DEFAULT_PDB_MAX_UNAVAILABLE = 1
DEFAULT_REDIS_PORT = DEFAULT_PORTS["redis"]

# Run by the readiness probe with the interpreter of the user's image (Celery needs one).
# It never prints the URL (probe output lands in Events), and when it cannot tell which port
# to look for it reports ready rather than stall every rollout.
BROKER_CONNECTED_PROBE = f"""\
import os, sys, urllib.parse
try:
    # kombu tries the ';' alternates in turn: a connection to any of their ports will do.
    urls = [urllib.parse.urlsplit(u.strip()) for u in os.environ["{BROKER_URL_ENV}"].split(";")]
    ports = {{"%04X" % (u.port or {DEFAULT_REDIS_PORT}) for u in urls if u.scheme in ("redis", "rediss")}}
    if any(u.scheme not in ("redis", "rediss") for u in urls):
        ports = set()  # Sentinel: the master's port is only known to the Sentinels
except Exception:
    ports = set()
if not ports:
    sys.exit(0)
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        with open(table) as rows:
            for row in list(rows)[1:]:
                cols = row.split()
                if cols[3] == "01" and cols[2].rsplit(":", 1)[1] in ports:
                    sys.exit(0)
    except OSError:
        pass
print("no established connection to the broker port(s)", ", ".join(str(int(p, 16)) for p in sorted(ports)))
sys.exit(1)
"""


# -- names and labels ------------------------------------------------------------------------------


def tier_child_name(pool_name: str, tier_name: str) -> str:
    """Name of the tier's Deployment and PodDisruptionBudget."""
    return f"{pool_name}-{tier_name}"


def tier_selector_labels(pool_name: str, tier_name: str) -> dict[str, str]:
    """The Deployment/PDB selector; immutable on a Deployment, so it holds only stable names."""
    return {POOL_LABEL: pool_name, TIER_LABEL: tier_name}


def tier_labels(pool_name: str, tier_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "celery-worker",
        "app.kubernetes.io/instance": pool_name,
        "app.kubernetes.io/component": "worker",
        MANAGED_BY_LABEL: MANAGED_BY,
        **tier_selector_labels(pool_name, tier_name),
    }


def owner_reference(kind: str, name: str, uid: str) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(name: str, namespace: str, labels: Mapping[str, str], owner: Manifest) -> Manifest:
    return {
        "name": name,
        "namespace": namespace,
        "labels": dict(labels),
        "ownerReferences": [owner],
    }


# -- pieces shared with the beat -------------------------------------------------------------------


def broker_tls_query(tls: BrokerTls) -> str:
    """The URL query kombu reads its TLS settings from (``ssl_*`` keys), pointing at the mounted files."""
    if tls.insecure_skip_verify:
        return "ssl_cert_reqs=none"  # explicit: kombu's silent fallback would look the same, unannounced
    query = ["ssl_cert_reqs=required"]
    if tls.ca is not None:
        query.append(f"ssl_ca_certs={BROKER_TLS_DIR}/{BROKER_TLS_CA}")
    if tls.client_certificate is not None:
        query += [f"ssl_certfile={BROKER_TLS_DIR}/{BROKER_TLS_CERT}", f"ssl_keyfile={BROKER_TLS_DIR}/{BROKER_TLS_KEY}"]
    return "&".join(query)


def _with_tls_query(url: str, tls: BrokerTls) -> str:
    extra = broker_tls_query(tls)
    segments = []
    for segment in url.split(";"):
        base = segment.strip()
        # The spec's own ssl_cert_reqs=required (the only query allowed) is replaced by ours.
        base = base.split("?", 1)[0]
        segments.append(f"{base}?{extra}" if base.startswith("rediss://") else base)
    return ";".join(segments)


def broker_url_env(broker: Broker) -> list[Manifest]:
    """The broker URL for Celery: a literal (schema-checked to carry no password) or a Secret ref.

    With spec.broker.tls the URL carries kombu's ``ssl_*`` options for the mounted files. A URL from
    a Secret is then one rediss:// URL without a query (the reconciler checks it): Kubernetes
    expands ``$(VAR)`` in env values, so the query is appended to it in the pod.
    """
    tls = broker.tls
    if broker.url_secret_ref is not None:
        ref = broker.url_secret_ref
        source = {"valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        if tls is None:
            return [{"name": BROKER_URL_ENV, **source}]
        return [
            {"name": BROKER_SECRET_URL_ENV, **source},
            {"name": BROKER_URL_ENV, "value": f"$({BROKER_SECRET_URL_ENV})?{broker_tls_query(tls)}"},
        ]
    # The model guarantees exactly one of the two.
    assert broker.url is not None
    return [{"name": BROKER_URL_ENV, "value": broker.url if tls is None else _with_tls_query(broker.url, tls)}]


def broker_tls_volume(broker: Broker) -> list[Manifest]:
    """The CA and client certificate of spec.broker.tls as files, for kombu in the pod."""
    tls = broker.tls
    if tls is None or (tls.ca is None and tls.client_certificate is None):
        return []
    sources: list[Manifest] = []
    if tls.ca is not None:
        item = {"items": [{"key": tls.ca.key, "path": BROKER_TLS_CA}]}
        if tls.ca.secret_name is not None:
            sources.append({"secret": {"name": tls.ca.secret_name, **item}})
        else:
            sources.append({"configMap": {"name": tls.ca.config_map_name, **item}})
    if tls.client_certificate is not None:
        c = tls.client_certificate
        items = [{"key": c.cert_key, "path": BROKER_TLS_CERT}, {"key": c.key_key, "path": BROKER_TLS_KEY}]
        sources.append({"secret": {"name": c.secret_name, "items": items}})
    return [{"name": BROKER_TLS_VOLUME, "projected": {"sources": sources, "defaultMode": 0o440}}]


def broker_tls_mounts(broker: Broker) -> list[Manifest]:
    if not broker_tls_volume(broker):
        return []
    return [{"name": BROKER_TLS_VOLUME, "mountPath": BROKER_TLS_DIR, "readOnly": True}]


def container_env(spec: WorkloadSpec) -> list[Manifest]:
    """Downward-API identity first (so `$(POD_NAME)` expands in args), the broker, then the user's.

    The user's names never collide with ours: the models reject OPERATOR_ENV names in spec.env.
    """
    return [
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": POD_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *broker_url_env(spec.broker),
        *spec.env,
    ]


def pod_labels(spec: WorkloadSpec, own: Mapping[str, str]) -> dict[str, str]:
    # Ours win: a user label overriding the selector would orphan the pods.
    return {**spec.pod_labels, **own}


def pod_spec_base(spec: WorkloadSpec) -> Manifest:
    """Pod-level fields copied from the spec; empty ones are left out (the apiserver drops them,
    and a field we set but the live object lacks would read as drift forever)."""
    pod: Manifest = {}
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    optional: Sequence[tuple[str, Any]] = (
        ("imagePullSecrets", spec.image_pull_secrets),
        ("nodeSelector", spec.node_selector),
        ("tolerations", spec.tolerations),
        ("affinity", spec.affinity),
        ("topologySpreadConstraints", spec.topology_spread_constraints),
        ("priorityClassName", spec.priority_class_name),
        ("securityContext", spec.security_context),
    )
    for key, value in optional:
        if value:
            pod[key] = value
    return pod


def container_base(spec: WorkloadSpec, name: str) -> Manifest:
    container: Manifest = {"name": name, "image": spec.image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def container_tail(
    spec: WorkloadSpec, resources: Mapping[str, Any] | None, mounts: Sequence[Manifest] = ()
) -> Manifest:
    """Fields after the command: env, resources, mounts, securityContext (empty ones left out)."""
    tail: Manifest = {"env": container_env(spec)}
    if spec.env_from:
        tail["envFrom"] = spec.env_from
    if resources:
        tail["resources"] = dict(resources)
    all_mounts = [*mounts, *broker_tls_mounts(spec.broker), *spec.volume_mounts]
    if all_mounts:
        tail["volumeMounts"] = all_mounts
    if spec.container_security_context:
        tail["securityContext"] = spec.container_security_context
    return tail


def config_hash(template: Mapping[str, Any]) -> str:
    """A short digest of a pod template, for the annotation that shows which config a pod runs."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_config_hash(template: Manifest) -> Manifest:
    """The template with its own digest (taken before the annotation exists) in its annotations."""
    digest = config_hash(template)
    metadata = dict(template["metadata"])
    metadata["annotations"] = {**metadata.get("annotations", {}), CONFIG_HASH_ANNOTATION: digest}
    return {**template, "metadata": metadata}


# -- the worker Deployment -------------------------------------------------------------------------


def worker_args(app: str, tier: Tier) -> list[str]:
    """`celery` arguments for one tier; `extra_args` come last so they can override ours."""
    args = [
        "-A",
        app,
        "worker",
        "-Q",
        ",".join(tier.queues),
        "--concurrency",
        str(tier.concurrency),
        "--pool",
        tier.pool,
        "--prefetch-multiplier",
        str(tier.prefetch_multiplier),
    ]
    if tier.max_tasks_per_child is not None:
        args += ["--max-tasks-per-child", str(tier.max_tasks_per_child)]
    if tier.max_memory_per_child_kib is not None:
        args += ["--max-memory-per-child", str(tier.max_memory_per_child_kib)]
    # Gossip, mingle and heartbeat are worker-to-worker broadcasts through the broker that a fleet
    # of many workers pays for on every start and every few seconds; the operator needs none of them,
    # Flower and celery-exporter need events and heartbeats (tier.monitoring turns them on).
    monitoring = tier.monitoring or Monitoring()
    args += ["-O", "fair"]
    if monitoring.events:
        args.append("--task-events")
    args += [f"--without-{name}" for name in ("gossip", "mingle", "heartbeat") if not getattr(monitoring, name)]
    if tier.soft_time_limit_seconds is not None:
        args += ["--soft-time-limit", str(tier.soft_time_limit_seconds)]
    if tier.time_limit_seconds is not None:
        args += ["--time-limit", str(tier.time_limit_seconds)]
    # The census asks this name (scale_in.hostname); the models refuse -n/--hostname in extraArgs.
    args += ["--loglevel", tier.log_level, "--hostname", node_name(f"$({POD_NAME_ENV})")]
    args += tier.extra_args
    # Settings without a flag go after `--` as Celery's command-line config (`worker_<name>=value`).
    config: list[str] = []
    if tier.shutdown is not None and tier.shutdown.soft_shutdown_timeout_seconds is not None:
        config.append(f"worker_soft_shutdown_timeout={tier.shutdown.soft_shutdown_timeout_seconds}")
        if tier.shutdown.soft_shutdown_on_idle:
            config.append("worker_enable_soft_shutdown_on_idle=true")
    if tier.disable_prefetch:
        config.append(DISABLE_PREFETCH_SETTING)
    if not config:
        return args
    # The user's own `--` settings come first; a second `--` would reach Celery as a setting and fail.
    return [*args, *config] if "--" in tier.extra_args else [*args, "--", *config]


def termination_grace_period(tier: Tier) -> int:
    """Seconds a SIGTERM'd worker gets for its warm shutdown (finishing the tasks it runs).

    The tier's own value wins; else the longest a task may run (hard limit, or the soft limit
    when only that is set) plus a margin; else a default.
    """
    if tier.termination_grace_period_seconds is not None:
        return tier.termination_grace_period_seconds
    soft = tier.shutdown.soft_shutdown_timeout_seconds if tier.shutdown is not None else None
    if soft is not None and tier.shutdown is not None and tier.shutdown.remap_sigterm:
        # SIGTERM starts the soft shutdown: running tasks get `soft` seconds, then are cut (and requeued).
        return soft + GRACE_MARGIN_SECONDS
    limit = tier.time_limit_seconds or tier.soft_time_limit_seconds
    if limit is not None:
        return limit + GRACE_MARGIN_SECONDS
    return DEFAULT_GRACE_SECONDS


def broker_readiness_probe() -> Manifest:
    return {
        "exec": {"command": ["python3", "-c", BROKER_CONNECTED_PROBE]},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        # A broker restart drops connections for a moment; don't flap readiness for that.
        "failureThreshold": 3,
    }


def _with_remap(tail: Manifest, tier: Tier) -> Manifest:
    """REMAP_SIGTERM=SIGQUIT makes the kubelet's SIGTERM a Celery soft shutdown."""
    if tier.shutdown is None or not tier.shutdown.remap_sigterm:
        return tail
    return {**tail, "env": [*tail["env"], {"name": REMAP_SIGTERM_ENV, "value": "SIGQUIT"}]}


def _merged_env(pool: Sequence[Manifest], tier: Sequence[Manifest]) -> list[Manifest]:
    by_name = {var["name"]: var for var in tier}
    return [by_name.pop(var["name"], var) for var in pool] + list(by_name.values())


def tier_workload(spec: CeleryWorkerPoolSpec, tier: Tier) -> CeleryWorkerPoolSpec:
    """The pool's pod fields with the tier's merged over them (models.MERGE_RULE)."""
    update: dict[str, Any] = {
        "env": _merged_env(spec.env, tier.env),
        "env_from": [*spec.env_from, *tier.env_from],
        "pod_labels": {**spec.pod_labels, **tier.pod_labels},
        "pod_annotations": {**spec.pod_annotations, **tier.pod_annotations},
        "node_selector": {**spec.node_selector, **tier.node_selector},
    }
    replaced = (
        "image",
        "tolerations",
        "affinity",
        "topology_spread_constraints",
        "priority_class_name",
        "command_prefix",
    )
    for name in replaced:
        value = getattr(tier, name)
        if value is not None:
            update[name] = value
    return spec.model_copy(update=update)


def rollout_strategy(tier: Tier) -> Manifest:
    # Surge first, then stop an old worker: by default a rolling tier never runs below its replica count.
    surge = tier.rollout.max_surge if tier.rollout and tier.rollout.max_surge is not None else 1
    unavailable = tier.rollout.max_unavailable if tier.rollout and tier.rollout.max_unavailable is not None else 0
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": unavailable, "maxSurge": surge}}


def _overlaid(template: Manifest, *overlays: Any, own_labels: Mapping[str, str], worker: Manifest) -> Manifest:
    """The overlays merged in turn; what the model depends on is put back (the models refuse it already, but
    an object stored before those rules must not break scale-in either), and so are the operator's volumes."""
    ours = {v["name"]: v for v in template["spec"].get("volumes", []) if v["name"] == BROKER_TLS_VOLUME}
    grace = template["spec"]["terminationGracePeriodSeconds"]
    for overlay in overlays:
        if overlay is not None:
            template = merge(template, overlay.model_dump(by_alias=True, exclude_none=True))
    template["metadata"]["labels"] = {**template["metadata"]["labels"], **own_labels}
    pod = template["spec"]
    kept = {key: worker[key] for key in ("image", "command", "args", "env")}
    pod["containers"] = [{**c, **kept} if c.get("name") == WORKER_CONTAINER else c for c in pod["containers"]]
    if ours:
        pod["volumes"] = [ours.get(v.get("name"), v) for v in pod["volumes"]]
    pod["terminationGracePeriodSeconds"] = grace
    return template


def tier_pod_template(pool_name: str, pool_spec: CeleryWorkerPoolSpec, tier: Tier) -> Manifest:
    """The tier's pod template, config-hash annotation included."""
    spec = tier_workload(pool_spec, tier)
    container: Manifest = {
        **container_base(spec, WORKER_CONTAINER),
        # Exec form, no shell: SIGTERM reaches Celery's main process, which starts a warm shutdown.
        # A command prefix (ddtrace-run...) execs celery in its place, keeping that true.
        "command": [*spec.command_prefix, "celery"],
        "args": worker_args(spec.app, tier),
        **_with_remap(container_tail(spec, tier.resources), tier),
        "readinessProbe": broker_readiness_probe(),
    }
    pod: Manifest = pod_spec_base(spec)
    if not spec.service_account_name:
        # Workers don't talk to the Kubernetes API; don't hand them the default account's token.
        pod["automountServiceAccountToken"] = False
    pod["terminationGracePeriodSeconds"] = termination_grace_period(tier)
    pod["containers"] = [container]
    volumes = [*broker_tls_volume(spec.broker), *spec.volumes]
    if volumes:
        pod["volumes"] = volumes
    own_labels = tier_labels(pool_name, tier.name)
    metadata: Manifest = {"labels": pod_labels(spec, own_labels)}
    if spec.pod_annotations:
        metadata["annotations"] = dict(spec.pod_annotations)
    template = {"metadata": metadata, "spec": pod}
    if spec.pod_template is not None or tier.pod_template is not None:
        template = _overlaid(template, spec.pod_template, tier.pod_template, own_labels=own_labels, worker=container)
    return with_config_hash(template)


def tier_deployment(
    pool_name: str,
    namespace: str,
    pool_uid: str,
    spec: CeleryWorkerPoolSpec,
    tier: Tier,
    replicas: int | None = None,
) -> Manifest:
    """The tier's apps/v1 Deployment; `spec.replicas` only when `replicas` is given (see module doc)."""
    owner = owner_reference(POOL_KIND, pool_name, pool_uid)
    deployment_spec: Manifest = {}
    if replicas is not None:
        deployment_spec["replicas"] = replicas
    deployment_spec |= {
        "selector": {"matchLabels": tier_selector_labels(pool_name, tier.name)},
        "strategy": rollout_strategy(tier),
        "template": tier_pod_template(pool_name, spec, tier),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(
            tier_child_name(pool_name, tier.name), namespace, tier_labels(pool_name, tier.name), owner
        ),
        "spec": deployment_spec,
    }


def tier_pdb(pool_name: str, namespace: str, pool_uid: str, tier: Tier) -> Manifest | None:
    """The tier's policy/v1 PodDisruptionBudget, or None when the tier asks for none."""
    budget = tier.pod_disruption_budget
    if budget is None or not budget.enabled:
        return None
    pdb_spec: Manifest = {}
    if budget.min_available is not None:
        pdb_spec["minAvailable"] = budget.min_available
    else:
        pdb_spec["maxUnavailable"] = (
            budget.max_unavailable if budget.max_unavailable is not None else DEFAULT_PDB_MAX_UNAVAILABLE
        )
    pdb_spec["selector"] = {"matchLabels": tier_selector_labels(pool_name, tier.name)}
    # Workers go unready while the broker is down; such pods must not block a node drain.
    pdb_spec["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    owner = owner_reference(POOL_KIND, pool_name, pool_uid)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(
            tier_child_name(pool_name, tier.name), namespace, tier_labels(pool_name, tier.name), owner
        ),
        "spec": pdb_spec,
    }


# -- the whole pool --------------------------------------------------------------------------------


def pool_children(
    pool_name: str,
    namespace: str,
    pool_uid: str,
    spec: CeleryWorkerPoolSpec,
    replicas: Mapping[str, int] | None = None,
) -> list[Manifest]:
    """Every desired child, tier by tier (Deployment, then its PDB if any).

    `replicas` (tier name -> count) puts `spec.replicas` into those tiers' Deployments; tiers not
    in it leave the field to the autoscaler, which is the normal case (see the module doc).
    """
    replicas = replicas or {}
    children: list[Manifest] = []
    for tier in spec.tiers:
        children.append(tier_deployment(pool_name, namespace, pool_uid, spec, tier, replicas.get(tier.name)))
        pdb = tier_pdb(pool_name, namespace, pool_uid, tier)
        if pdb is not None:
            children.append(pdb)
    return children
