"""What a pod's container becomes on this machine: argv, environment, files. (pure)

The kubelet's rules, applied to a local process instead of a container image:

- env: `envFrom` first, then `env` in order; each value may reference the variables defined
  before it with `$(NAME)`; command and args are expanded with the final environment.
- `valueFrom.fieldRef` reads the pod (name, namespace, uid, labels, annotations, node, service
  account, IPs); `secretKeyRef` / `configMapKeyRef` read the objects through an injected
  :class:`ObjectSource`; a missing object or key fails the container unless `optional`.
- volumes become directories under the pod's directory; each `mountPath` is mapped to its
  directory, and any argument naming a path under a mount is rewritten to the local path (a
  process cannot see `/celery-fleet/elector.pyz`, but it can see the pod's copy of it).
- files of the image: a fixed table maps image paths to files on this machine (the elector the
  operator image ships is built from the repository's own `celery_fleet.elector` package).

Nothing here reads the cluster or the disk; the runtime does that and hands the results in.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet_localrun.expansion import expand

Manifest = Mapping[str, Any]

DEFAULT_GRACE_SECONDS = 30  # the apiserver's default terminationGracePeriodSeconds
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBECONFIG_ENV = "KUBECONFIG"

_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ContainerConfigError(Exception):
    """The container cannot be started as specified (the kubelet's CreateContainerConfigError)."""


class ObjectSource(Protocol):
    """Reads the data of Secrets and ConfigMaps (decoded to text); None when the object is absent."""

    def secret_data(self, namespace: str, name: str) -> Mapping[str, str] | None: ...

    def config_map_data(self, namespace: str, name: str) -> Mapping[str, str] | None: ...


@dataclass(frozen=True)
class ProcessSpec:
    """One container as a local process."""

    container: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    # The Celery broker port the readiness check looks for, when the container has the operator's
    # broker readiness probe (None: ready once started).
    broker_port: int | None = None
    probe_period: float = 10.0
    probe_failure_threshold: int = 3


@dataclass(frozen=True)
class VolumeFiles:
    """A volume as a directory: the files to write into it (empty for an emptyDir)."""

    name: str
    path: Path
    files: Mapping[str, bytes] = field(default_factory=dict)
    # Set for a projected service account token: write the token the runtime requested here.
    token_path: str | None = None
    token_audiences: tuple[str, ...] = ()
    token_expiration_seconds: int = 3600


@dataclass(frozen=True)
class PodLayout:
    """Where a pod lives on this machine."""

    root: Path

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def volume(self, name: str) -> Path:
        return self.volumes / name

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig.json"


# -- fields of the pod ------------------------------------------------------------------------------


def field_value(pod: Manifest, field_path: str) -> str:
    """The downward API: the value of `fieldRef.fieldPath` for this pod."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(ip.get("ip", "") for ip in status.get("hostIPs") or []),
        "status.podIPs": ",".join(ip.get("ip", "") for ip in status.get("podIPs") or []),
    }
    if field_path in simple:
        value = simple[field_path]
        return "" if value is None else str(value)
    match = _LABEL_REF.match(field_path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ContainerConfigError(f"fieldRef.fieldPath {field_path!r} is not supported by the local runtime")


# -- environment ------------------------------------------------------------------------------------


def _key_ref(
    kind: str, ref: Manifest, namespace: str, data: Callable[[str, str], Mapping[str, str] | None]
) -> str | None:
    name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional"))
    values = data(namespace, name)
    if values is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind} "{name}" not found in namespace {namespace}')
    if key not in values:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return values[key]


def container_env(pod: Manifest, container: Manifest, objects: ObjectSource) -> dict[str, str]:
    """The variables the container defines. As with the kubelet, `$(NAME)` sees only these (the
    ones defined earlier), never what the image sets."""
    namespace = str((pod.get("metadata") or {}).get("namespace") or "")
    env: dict[str, str] = {}
    for index, source in enumerate(container.get("envFrom") or []):
        prefix = str(source.get("prefix") or "")
        for kind, key, read in (
            ("secret", "secretRef", objects.secret_data),
            ("configmap", "configMapRef", objects.config_map_data),
        ):
            ref = source.get(key)
            if ref is None:
                continue
            values = read(namespace, ref.get("name", ""))
            if values is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'envFrom[{index}]: {kind} "{ref.get("name")}" not found')
            for key_name, key_value in values.items():
                env[prefix + key_name] = key_value
    for var in container.get("env") or []:
        name = str(var.get("name") or "")
        value_from = var.get("valueFrom")
        if value_from is None:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        value: str | None
        if "fieldRef" in value_from:
            value = field_value(pod, str(value_from["fieldRef"].get("fieldPath", "")))
        elif "secretKeyRef" in value_from:
            value = _key_ref("secret", value_from["secretKeyRef"], namespace, objects.secret_data)
        elif "configMapKeyRef" in value_from:
            value = _key_ref("configmap", value_from["configMapKeyRef"], namespace, objects.config_map_data)
        else:
            raise ContainerConfigError(
                f"env {name}: valueFrom {sorted(value_from)} is not supported by the local runtime"
            )
        if value is not None:
            env[name] = value
    return env


# -- files ------------------------------------------------------------------------------------------


def _items(values: Mapping[str, str], items: Sequence[Manifest] | None, where: str) -> dict[str, bytes]:
    if not items:
        return {key: value.encode() for key, value in values.items()}
    files: dict[str, bytes] = {}
    for item in items:
        key = item.get("key", "")
        if key not in values:
            raise ContainerConfigError(f"{where}: key {key!r} not found")
        files[str(item.get("path") or key)] = values[key].encode()
    return files


def pod_volumes(pod: Manifest, layout: PodLayout, objects: ObjectSource) -> list[VolumeFiles]:
    """Every volume of the pod as a local directory and the files it holds."""
    namespace = str((pod.get("metadata") or {}).get("namespace") or "")
    volumes: list[VolumeFiles] = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = str(volume.get("name"))
        path = layout.volume(name)
        where = f"volume {name}"
        if "emptyDir" in volume:
            volumes.append(VolumeFiles(name, path))
        elif "configMap" in volume or "secret" in volume:
            is_secret = "secret" in volume
            ref = volume["secret" if is_secret else "configMap"]
            obj_name = ref.get("secretName" if is_secret else "name", "")
            read = objects.secret_data if is_secret else objects.config_map_data
            values = read(namespace, obj_name)
            if values is None:
                if ref.get("optional"):
                    volumes.append(VolumeFiles(name, path))
                    continue
                raise ContainerConfigError(f'{where}: {"secret" if is_secret else "configmap"} "{obj_name}" not found')
            volumes.append(VolumeFiles(name, path, _items(values, ref.get("items"), where)))
        elif "projected" in volume:
            volumes.append(_projected(pod, name, path, volume["projected"], objects, namespace))
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise ContainerConfigError(f"{where}: {kinds} volumes are not supported by the local runtime")
    return volumes


def _projected(
    pod: Manifest, name: str, path: Path, projected: Manifest, objects: ObjectSource, namespace: str
) -> VolumeFiles:
    files: dict[str, bytes] = {}
    token: Manifest | None = None
    where = f"volume {name}"
    for source in projected.get("sources") or []:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
        elif "configMap" in source or "secret" in source:
            is_secret = "secret" in source
            ref = source["secret" if is_secret else "configMap"]
            read = objects.secret_data if is_secret else objects.config_map_data
            values = read(namespace, ref.get("name", ""))
            if values is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(
                    f'{where}: {"secret" if is_secret else "configmap"} "{ref.get("name")}" not found'
                )
            files.update(_items(values, ref.get("items"), where))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" not in item:
                    raise ContainerConfigError(f"{where}: downwardAPI resourceFieldRef is not supported locally")
                files[str(item["path"])] = field_value(pod, str(item["fieldRef"].get("fieldPath", ""))).encode()
        else:
            raise ContainerConfigError(f"{where}: projected source {sorted(source)} is not supported locally")
    if token is None:
        return VolumeFiles(name, path, files)
    audience = token.get("audience")
    return VolumeFiles(
        name,
        path,
        files,
        token_path=str(token.get("path") or "token"),
        token_audiences=(str(audience),) if audience else (),
        token_expiration_seconds=int(token.get("expirationSeconds") or 3600),
    )


def mount_table(container: Manifest, volumes: Sequence[VolumeFiles]) -> dict[str, Path]:
    """mountPath -> local directory (or file, for a subPath) for the container's mounts."""
    by_name = {v.name: v.path for v in volumes}
    table: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = mount.get("name", "")
        if volume not in by_name:
            raise ContainerConfigError(f"volumeMounts: no volume named {volume!r} in the pod")
        local = by_name[volume]
        if mount.get("subPath"):
            local = local / str(mount["subPath"])
        table[posixpath.normpath(str(mount.get("mountPath", "")))] = local
    return table


def rewrite_path(arg: str, paths: Mapping[str, Path]) -> str:
    """`arg` with a leading in-container path (or the value of `--opt=path`) mapped to this machine."""
    prefix = ""
    value = arg
    if arg.startswith("-") and "=" in arg:
        prefix, value = arg.split("=", 1)
        prefix += "="
    if not value.startswith("/"):
        return arg
    # The longest mapped path wins, so a mount inside another mount resolves to the inner one.
    for mapped in sorted(paths, key=len, reverse=True):
        if value == mapped:
            return prefix + str(paths[mapped])
        if value.startswith(mapped.rstrip("/") + "/"):
            return prefix + str(paths[mapped] / value[len(mapped.rstrip("/")) + 1 :])
    return arg


# -- the whole container ----------------------------------------------------------------------------


def broker_port(url: str | None) -> int | None:
    """The port the operator's readiness probe looks for (see `planning.workload`), of the first
    ';' segment: None when the URL is not a Redis one, as the probe then passes."""
    if not url:
        return None
    try:
        parsed = parse_broker_url(url)
    except BrokerUrlError:
        return None
    return parsed.endpoints[0].port if parsed.kind == "redis" else None


def process_spec(
    pod: Manifest,
    container: Manifest,
    *,
    env: Mapping[str, str],
    base_env: Mapping[str, str],
    paths: Mapping[str, Path],
    cwd: Path,
    broker_probe: bool,
    broker_url_env: str,
) -> ProcessSpec:
    """argv from command + args and the final environment.

    `env` are the container's own variables (command and args are expanded with them only),
    `base_env` what the image would set below them. `broker_probe`: the container carries the
    operator's broker readiness probe, which the local check of `procfs` stands in for.
    """
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if not command:
        raise ContainerConfigError(
            f"container {container.get('name')}: no command; the local runtime cannot read an image's ENTRYPOINT"
        )
    argv = tuple(rewrite_path(expand(part, env), paths) for part in (*command, *args))
    working_dir = container.get("workingDir")
    if working_dir:
        mapped = rewrite_path(str(working_dir), paths)
        cwd = Path(mapped) if mapped != working_dir else cwd
    probe = container.get("readinessProbe") or {}
    return ProcessSpec(
        container=str(container.get("name")),
        argv=argv,
        env={**base_env, **env},
        cwd=cwd,
        broker_port=broker_port(env.get(broker_url_env)) if broker_probe else None,
        probe_period=float(probe.get("periodSeconds") or 10),
        probe_failure_threshold=int(probe.get("failureThreshold") or 3),
    )


def grace_seconds(pod: Manifest) -> float:
    """Seconds between SIGTERM and SIGKILL: the pod's terminationGracePeriodSeconds, or a shorter
    grace the deletion asked for (`kubectl delete --grace-period=5`).

    A deletion grace of 0 is not taken at its word: kwok removes every deleted pod at once by
    deleting it again with grace 0, so 0 is almost always kwok's cleanup, not anyone's intent
    (`kubectl delete --force` cannot be told apart and gets the pod's grace too).
    """
    value = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    own = float(DEFAULT_GRACE_SECONDS if value is None else value)
    asked = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    if asked is not None and 0 < float(asked) < own:
        return float(asked)
    return own


def service_account_kubeconfig(server: str, ca_file: str | None, token_file: Path, namespace: str) -> dict[str, Any]:
    """A kubeconfig that authenticates as the pod's ServiceAccount (its projected token), so a
    process that talks to the apiserver has the pod's own RBAC, not the developer's."""
    cluster: dict[str, Any] = {"server": server}
    if ca_file:
        cluster["certificate-authority"] = ca_file
    else:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "pod", "context": {"cluster": "local", "user": "pod", "namespace": namespace}}],
        "current-context": "pod",
    }
