"""Turns a pod into local process specs: resolves env, writes its volumes, requests its token.

The "image" of every container is this machine: `base_env` holds what an image would set (PATH
with the project's virtualenv first, PYTHONPATH with the application), and `image_files` maps
files an image would carry to local ones (the operator image's elector is built from the repository's package).

A pod that mounts its ServiceAccount token (automountServiceAccountToken) gets a kubeconfig
that authenticates with that token, in `$KUBECONFIG`: a process in a real pod would find the
token at /var/run/secrets/..., which a local process cannot have, so it is pointed at the same
token another way. It then has the pod's own RBAC, not the developer's admin rights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery_fleet.api.models import BROKER_URL_ENV
from celery_fleet.planning.beat_workload import ELECTOR_SOURCE
from celery_fleet.planning.workload import broker_readiness_probe
from celery_fleet_localrun.cluster import LocalCluster
from celery_fleet_localrun.container import (
    KUBECONFIG_ENV,
    SERVICE_ACCOUNT_MOUNT,
    ContainerConfigError,
    PodLayout,
    ProcessSpec,
    VolumeFiles,
    container_env,
    mount_table,
    pod_volumes,
    process_spec,
    service_account_kubeconfig,
)
from celery_fleet_localrun.supervisor import PreparedPod

log = logging.getLogger(__name__)

Manifest = Mapping[str, Any]

# kubelet refreshes a projected token at 80% of its lifetime.
TOKEN_REFRESH_FRACTION = 0.8


def repository_elector() -> Path:
    """The single-file elector the operator image would carry, built from this checkout's package
    (named by its digest, so concurrent runs share it and an edited package gets a new file)."""
    from celery_fleet.elector import bundle

    content = bundle.build_bytes()
    target = Path(tempfile.gettempdir()) / f"celery-fleet-elector-{hashlib.sha256(content).hexdigest()[:16]}.pyz"
    if not target.exists():
        bundle.build(target)
    return target


def default_image_files() -> dict[str, Path]:
    return {ELECTOR_SOURCE: repository_elector()}


@dataclass
class _Token:
    path: Path
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    seconds: int
    written_at: float


class LocalPreparer:
    def __init__(
        self,
        cluster: LocalCluster,
        state_dir: Path,
        base_env: Mapping[str, str],
        image_files: Mapping[str, Path] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.base_env = dict(base_env)
        self.image_files = dict(image_files if image_files is not None else default_image_files())
        self.clock = clock
        self._tokens: dict[str, list[_Token]] = {}
        self._broker_probe = broker_readiness_probe()["exec"]["command"]

    def layout(self, pod: Manifest) -> PodLayout:
        meta = pod["metadata"]
        return PodLayout(self.state_dir / "pods" / str(meta["namespace"]) / f"{meta['name']}-{str(meta['uid'])[:8]}")

    def log_dir(self, pod: Manifest) -> Path:
        meta = pod["metadata"]
        return self.state_dir / "logs" / str(meta["namespace"]) / str(meta["name"])

    # -- Preparer ----------------------------------------------------------------------------------

    def prepare(self, pod: Manifest) -> PreparedPod:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        layout = self.layout(pod)
        volumes = pod_volumes(pod, layout, self.cluster)
        tokens = self._write_volumes(pod, volumes)
        token_dir = next((v.path for v in volumes if v.token_path is not None), None)

        def specs(containers: list[Manifest]) -> tuple[ProcessSpec, ...]:
            out = []
            for container in containers:
                paths = {**self.image_files, **mount_table(container, volumes)}
                base = dict(self.base_env, HOSTNAME=str(meta["name"]))
                sa_dir = paths.get(SERVICE_ACCOUNT_MOUNT)
                if sa_dir is not None and sa_dir == token_dir:
                    base[KUBECONFIG_ENV] = str(self._write_kubeconfig(layout, sa_dir, str(meta["namespace"])))
                    # What the kubelet sets for in-cluster clients (the beat elector is one).
                    server = urlsplit(self.cluster.server)
                    base["KUBERNETES_SERVICE_HOST"] = server.hostname or ""
                    base["KUBERNETES_SERVICE_PORT"] = str(server.port or 443)
                probe = (container.get("readinessProbe") or {}).get("exec", {}).get("command")
                out.append(
                    process_spec(
                        pod,
                        container,
                        env=container_env(pod, container, self.cluster),
                        base_env=base,
                        paths=paths,
                        cwd=layout.root,
                        broker_probe=probe == self._broker_probe,
                        broker_url_env=BROKER_URL_ENV,
                    )
                )
            return tuple(out)

        for init in spec.get("initContainers") or []:
            if init.get("restartPolicy") == "Always":
                raise ContainerConfigError(f"init container {init.get('name')}: sidecars are not supported locally")
        prepared = PreparedPod(
            init=specs(spec.get("initContainers") or []),
            containers=specs(spec.get("containers") or []),
            log_dir=self.log_dir(pod),
        )
        self._tokens[str(meta["uid"])] = tokens
        return prepared

    def cleanup(self, pod: Manifest) -> None:
        self._tokens.pop(str(pod["metadata"]["uid"]), None)
        shutil.rmtree(self.layout(pod).root, ignore_errors=True)

    # -- files -------------------------------------------------------------------------------------

    def _write_volumes(self, pod: Manifest, volumes: list[VolumeFiles]) -> list[_Token]:
        namespace = str(pod["metadata"]["namespace"])
        service_account = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
        tokens = []
        for volume in volumes:
            volume.path.mkdir(parents=True, exist_ok=True)
            for rel, content in volume.files.items():
                _write(volume.path / rel, content)
            if volume.token_path is not None:
                token = _Token(
                    volume.path / volume.token_path,
                    namespace,
                    service_account,
                    volume.token_audiences,
                    volume.token_expiration_seconds,
                    0.0,
                )
                self._write_token(token)
                tokens.append(token)
        return tokens

    def _write_token(self, token: _Token) -> None:
        from celery_fleet.kube.client import ApiError

        try:
            value = self.cluster.service_account_token(
                token.namespace, token.service_account, token.audiences, token.seconds
            )
        except ApiError as err:
            raise ContainerConfigError(
                f"cannot get a token for ServiceAccount {token.namespace}/{token.service_account}: {err}"
            ) from None
        _write(token.path, value.encode(), mode=0o600)
        token.written_at = self.clock()

    def refresh_tokens(self) -> None:
        """Renew projected tokens at 80% of their lifetime, as the kubelet does."""
        now = self.clock()
        for tokens in self._tokens.values():
            for token in tokens:
                if now - token.written_at >= TOKEN_REFRESH_FRACTION * token.seconds:
                    try:
                        self._write_token(token)
                    except ContainerConfigError as exc:
                        log.warning("%s", exc)

    def _write_kubeconfig(self, layout: PodLayout, sa_dir: Path, namespace: str) -> Path:
        ca_file = self.cluster.ca_file
        if ca_file:
            # The client library keeps the admin kubeconfig's CA in a temp file of this process;
            # give the pod a copy of its own.
            _write(layout.root / "ca.crt", Path(ca_file).read_bytes())
            ca_file = str(layout.root / "ca.crt")
        config = service_account_kubeconfig(self.cluster.server, ca_file, sa_dir / "token", namespace)
        _write(layout.kubeconfig, json.dumps(config, indent=1).encode(), mode=0o600)
        return layout.kubeconfig


def _write(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Atomically, so a process re-reading the file (a refreshed token) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    os.replace(tmp, path)
