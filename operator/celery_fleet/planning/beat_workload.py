"""Desired objects of a CeleryBeat: `celery beat` behind a Lease elector, with its RBAC. (pure)

The elector must run inside the user's Celery image, which has Python but nothing of ours. The
operator image ships the standard-library-only elector as one file (a zipapp built from the
``celery_fleet.elector`` package) at ``ELECTOR_SOURCE``; an init container started from that
image copies it into an emptyDir, and the beat container runs
``python3 <elector> ... -- celery beat ...``. No wheel to install, no sidecar whose lifetime could
drift from beat's: the elector is PID 1 of the beat container and beat its child.

The elector's Role covers only the one Lease, and only what the elector sends (GET and PUT):
RBAC cannot restrict ``create`` to a resourceName, so the operator creates the Lease itself (owned
by the CeleryBeat) and the pods never need ``create``.

The operator's Lease carries no spec at all: the electors own every spec field. A release writes
``leaseDurationSeconds: 1`` (free at once); an operator that re-applied the configured duration
would turn that into a lease the standby must wait out, and bump the resourceVersion under the
leader. An empty, never-held Lease is free at once, so the first pod starts beat without delay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from celery_fleet.api.models import (
    BEAT_KIND,
    ELECTOR_DIR,
    ELECTOR_VOLUME,
    GROUP,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    SCHEDULE_DIR,
    SCHEDULE_VOLUME,
    CeleryBeatSpec,
)
from celery_fleet.elector import BUNDLE_FILE_NAME as ELECTOR_FILE
from celery_fleet.elector import SERVICE_ACCOUNT_DIR
from celery_fleet.elector.process import UNKILLABLE_AFTER_SECONDS
from celery_fleet.planning.workload import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Manifest,
    broker_tls_volume,
    container_base,
    container_tail,
    object_meta,
    owner_reference,
    pod_labels,
    pod_spec_base,
    with_config_hash,
)

BEAT_LABEL = f"{GROUP}/beat"
BEAT_CONTAINER = "beat"
INSTALL_CONTAINER = "install-elector"

# Where the operator image carries the elector, and where the beat container finds it.
ELECTOR_SOURCE = f"/opt/celery-fleet/{ELECTOR_FILE}"
# The elector's and the schedule's volumes and mount paths are declared in api.models, whose
# rules keep the user's volumes and mounts off them.
ELECTOR_PATH = f"{ELECTOR_DIR}/{ELECTOR_FILE}"
# PersistentScheduler writes its state file into the working directory by default, which a
# non-root user or a read-only root filesystem cannot; give it a writable place of its own.
SCHEDULE_FILE = f"{SCHEDULE_DIR}/celerybeat-schedule"

# spec.scheduler unset: schedule state on the Lease, fenced (docs/beat.md). The elector ships it
# and, with --schedule-state, puts it on beat's path.
DEFAULT_SCHEDULER = "celery_fleet.beat.scheduler:LeaseScheduler"

# CeleryBeatSpec has no log level; `--loglevel` in extraArgs overrides this (the last one wins).
BEAT_LOG_LEVEL = "INFO"
BEAT_GRACE_MARGIN_SECONDS = 5
# A release is at most a PUT, a re-read after a conflict and a second PUT.
RELEASE_REQUESTS = 3

# Restricted-profile settings for the container we add; the user's containers follow their spec.
# No runAsUser: the image's numeric USER is used (and platforms that assign UIDs keep working).
RESTRICTED_CONTAINER_SECURITY: Manifest = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The copy is a single small file; explicit requests/limits keep namespaces with quotas happy.
INSTALL_RESOURCES: Manifest = {
    "requests": {"cpu": "10m", "memory": "32Mi"},
    "limits": {"cpu": "100m", "memory": "64Mi"},
}


@dataclass(frozen=True)
class BeatNames:
    service_account: str
    role: str
    role_binding: str
    lease: str
    deployment: str


def beat_names(beat_name: str) -> BeatNames:
    return BeatNames(
        service_account=f"{beat_name}-beat",
        role=f"{beat_name}-beat-lease",
        role_binding=f"{beat_name}-beat-lease",
        lease=f"{beat_name}-beat",
        deployment=f"{beat_name}-beat",
    )


def beat_selector_labels(beat_name: str) -> dict[str, str]:
    return {BEAT_LABEL: beat_name}


def beat_labels(beat_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "celery-beat",
        "app.kubernetes.io/instance": beat_name,
        "app.kubernetes.io/component": "beat",
        MANAGED_BY_LABEL: MANAGED_BY,
        **beat_selector_labels(beat_name),
    }


def beat_pod_service_account(beat_name: str, spec: CeleryBeatSpec) -> str:
    """The account the beat pods run as, which the lease Role is bound to."""
    return spec.service_account_name or beat_names(beat_name).service_account


def _meta(name: str, namespace: str, beat_name: str, beat_uid: str) -> Manifest:
    return object_meta(name, namespace, beat_labels(beat_name), owner_reference(BEAT_KIND, beat_name, beat_uid))


def beat_service_account(beat_name: str, namespace: str, beat_uid: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(beat_names(beat_name).service_account, namespace, beat_name, beat_uid),
    }


def beat_role(beat_name: str, namespace: str, beat_uid: str) -> Manifest:
    names = beat_names(beat_name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(names.role, namespace, beat_name, beat_uid),
        "rules": [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [names.lease],
                "verbs": ["get", "update"],
            }
        ],
    }


def beat_role_binding(beat_name: str, namespace: str, beat_uid: str, spec: CeleryBeatSpec) -> Manifest:
    names = beat_names(beat_name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(names.role_binding, namespace, beat_name, beat_uid),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [
            {"kind": "ServiceAccount", "name": beat_pod_service_account(beat_name, spec), "namespace": namespace}
        ],
    }


def beat_lease(beat_name: str, namespace: str, beat_uid: str) -> Manifest:
    """The Lease, metadata only: its spec belongs to the electors (see the module doc)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": _meta(beat_names(beat_name).lease, namespace, beat_name, beat_uid),
    }


def beat_command(beat_name: str, spec: CeleryBeatSpec) -> list[str]:
    """The elector, then `celery beat` as the command it runs while it leads."""
    lease = spec.lease
    return [
        "python3",
        ELECTOR_PATH,
        "--namespace",
        f"$({POD_NAMESPACE_ENV})",
        "--lease",
        beat_names(beat_name).lease,
        "--identity",
        f"$({POD_NAME_ENV})",
        "--duration",
        str(lease.duration_seconds),
        "--renew-deadline",
        str(lease.renew_deadline_seconds),
        "--retry-period",
        str(lease.retry_period_seconds),
        "--stop-grace",
        f"{stop_grace(spec):g}",
        # The kubelet's default, said out loud so a runtime that maps mounts (localrun) can see it.
        "--service-account-dir",
        SERVICE_ACCOUNT_DIR,
        *(["--schedule-state"] if spec.scheduler is None else []),
        "--",
        "celery",
        "-A",
        spec.app,
        "beat",
        "--scheduler",
        spec.scheduler or DEFAULT_SCHEDULER,
        "--schedule",
        SCHEDULE_FILE,
        "--loglevel",
        BEAT_LOG_LEVEL,
        *spec.extra_args,
    ]


def stop_grace(spec: CeleryBeatSpec) -> float:
    """Seconds beat gets between SIGTERM and SIGKILL when it must stop; passed to the elector
    explicitly because the pod's grace period is computed from it. Half the gap between the renew
    deadline and the lease duration, as the elector's own default: a leader that lost the lease
    has then stopped beat well before a standby may acquire."""
    lease = spec.lease
    return (lease.duration_seconds - lease.renew_deadline_seconds) / 2


def beat_grace_period(spec: CeleryBeatSpec) -> int:
    """Time for the elector's graceful exit, so the Lease is released rather than left to expire.

    On SIGTERM a renewal in flight may run to the renew deadline; then beat gets its stop grace,
    the elector waits a bounded time for it to die after SIGKILL, and releases (a few requests,
    each bounded by max(1 s, the retry period)).
    """
    lease = spec.lease
    total = (
        lease.renew_deadline_seconds
        + stop_grace(spec)
        + UNKILLABLE_AFTER_SECONDS
        + RELEASE_REQUESTS * max(1, lease.retry_period_seconds)
        + BEAT_GRACE_MARGIN_SECONDS
    )
    return math.ceil(total)


def _install_elector(elector_image: str, spec: CeleryBeatSpec) -> Manifest:
    container: Manifest = {"name": INSTALL_CONTAINER, "image": elector_image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    # Python rather than `cp`: the elector image surely has the interpreter, not necessarily a shell
    # toolbox (distroless).
    container["command"] = [
        "python3",
        "-c",
        "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
        ELECTOR_SOURCE,
        ELECTOR_PATH,
    ]
    container["resources"] = INSTALL_RESOURCES
    container["volumeMounts"] = [{"name": ELECTOR_VOLUME, "mountPath": ELECTOR_DIR}]
    container["securityContext"] = RESTRICTED_CONTAINER_SECURITY
    return container


def beat_pod_template(beat_name: str, spec: CeleryBeatSpec, default_elector_image: str) -> Manifest:
    beat: Manifest = {
        **container_base(spec, BEAT_CONTAINER),
        # Exec form: SIGTERM reaches the elector, which stops beat and releases the Lease.
        "command": beat_command(beat_name, spec),
        **container_tail(
            spec,
            spec.resources,
            mounts=[
                # Read-only: the application must not be able to replace the elector.
                {"name": ELECTOR_VOLUME, "mountPath": ELECTOR_DIR, "readOnly": True},
                {"name": SCHEDULE_VOLUME, "mountPath": SCHEDULE_DIR},
            ],
        ),
    }
    pod: Manifest = pod_spec_base(spec)
    pod["serviceAccountName"] = beat_pod_service_account(beat_name, spec)
    # The elector talks to the apiserver with this token.
    pod["automountServiceAccountToken"] = True
    pod["terminationGracePeriodSeconds"] = beat_grace_period(spec)
    pod["initContainers"] = [_install_elector(spec.elector_image or default_elector_image, spec)]
    pod["containers"] = [beat]
    volumes: Sequence[Manifest] = [
        {"name": ELECTOR_VOLUME, "emptyDir": {}},
        {"name": SCHEDULE_VOLUME, "emptyDir": {}},
        *broker_tls_volume(spec.broker),
        *spec.volumes,
    ]
    pod["volumes"] = list(volumes)
    metadata: Manifest = {"labels": pod_labels(spec, beat_labels(beat_name))}
    if spec.pod_annotations:
        metadata["annotations"] = dict(spec.pod_annotations)
    return with_config_hash({"metadata": metadata, "spec": pod})


def beat_deployment(
    beat_name: str, namespace: str, beat_uid: str, spec: CeleryBeatSpec, default_elector_image: str
) -> Manifest:
    """1 + standby pods; Recreate, so a new version never runs beside the old one."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(beat_names(beat_name).deployment, namespace, beat_name, beat_uid),
        "spec": {
            # The operator is the only writer of beat replicas (no autoscaling).
            "replicas": 1 + spec.standby,
            "selector": {"matchLabels": beat_selector_labels(beat_name)},
            "strategy": {"type": "Recreate"},
            "template": beat_pod_template(beat_name, spec, default_elector_image),
        },
    }


def beat_children(
    beat_name: str, namespace: str, beat_uid: str, spec: CeleryBeatSpec, default_elector_image: str
) -> list[Manifest]:
    """Every desired child, in apply order: identity and RBAC, the Lease, then the pods."""
    return [
        beat_service_account(beat_name, namespace, beat_uid),
        beat_role(beat_name, namespace, beat_uid),
        beat_role_binding(beat_name, namespace, beat_uid, spec),
        beat_lease(beat_name, namespace, beat_uid),
        beat_deployment(beat_name, namespace, beat_uid, spec, default_elector_image),
    ]
