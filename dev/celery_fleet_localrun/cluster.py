"""The local runtime's reads and writes against the apiserver (pods, Secrets, tokens, pod status)."""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from kubernetes import client

from celery_fleet.kube.client import ApiError, Kube, segment

log = logging.getLogger(__name__)

MANAGED_SELECTOR = "app.kubernetes.io/managed-by=celery-fleet"
# The pods the local runtime runs carry this label (a pool's or beat's `podLabels`): kwok's stage for them
# (hack/kwok/pod-run-by-local-runtime.yaml) leaves their readiness to us, so a pod is never Ready before its
# process runs. Unlabelled pods are kwok's: Ready at once, with nothing running.
RUN_LABEL = "local-runtime.celeryfleet.io/run"
RUN_LABEL_VALUE = "true"
RUN_LABELS = {RUN_LABEL: RUN_LABEL_VALUE}


def runs_here(pod: Mapping[str, Any]) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL) == RUN_LABEL_VALUE


class LocalCluster:
    def __init__(self, api: client.ApiClient, namespaces: Sequence[str] = (), selector: str = MANAGED_SELECTOR):
        """`namespaces`: names or shell patterns (`t1234-*`); empty means every namespace."""
        self.api = api
        self._kube = Kube(api)
        self.namespaces = list(namespaces)
        self.selector = selector
        self._passed_over: set[str] = set()

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    @property
    def ca_file(self) -> str | None:
        ca = self.api.configuration.ssl_ca_cert
        return str(ca) if ca else None

    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json", timeout: float = 10) -> Any:  # fmt: skip
        return self._kube.request(method, path, body=body, query=query, content_type=content_type, timeout=timeout)

    def in_scope(self, namespace: str) -> bool:
        return not self.namespaces or any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)

    def pods(self) -> list[dict[str, Any]]:
        """Pods matching the selector in the namespaces in scope that carry RUN_LABEL (one list over all
        namespaces). A pod in scope without the label is named once in the log: kwok already calls it Ready."""
        data = self._call("GET", "/api/v1/pods", query=[("labelSelector", self.selector)])
        items = cast(list[dict[str, Any]], (data or {}).get("items") or [])
        in_scope = [p for p in items if self.in_scope(str(p["metadata"].get("namespace")))]
        for pod in in_scope:
            meta = pod["metadata"]
            if not runs_here(pod) and meta.get("uid") not in self._passed_over:
                self._passed_over.add(str(meta.get("uid")))
                log.warning(
                    "pod %s/%s lacks the label %s=%s (set it in the pool's or beat's podLabels): not run here",
                    meta.get("namespace"), meta.get("name"), RUN_LABEL, RUN_LABEL_VALUE,
                )  # fmt: skip
        return [p for p in in_scope if runs_here(p)]

    def _data(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            path = f"/api/v1/namespaces/{segment(namespace)}/{kind}/{segment(name)}"
            return cast(dict[str, Any], self._call("GET", path))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def secret_data(self, namespace: str, name: str) -> Mapping[str, str] | None:
        secret = self._data("secrets", namespace, name)
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in (secret.get("data") or {}).items()}

    def config_map_data(self, namespace: str, name: str) -> Mapping[str, str] | None:
        config_map = self._data("configmaps", namespace, name)
        if config_map is None:
            return None
        values = {str(k): str(v) for k, v in (config_map.get("data") or {}).items()}
        for k, v in (config_map.get("binaryData") or {}).items():
            values[k] = base64.b64decode(v).decode("utf-8", errors="replace")
        return values

    def service_account_token(
        self, namespace: str, service_account: str, audiences: Sequence[str], seconds: int
    ) -> str:
        """A token for a projected token volume. Unlike the kubelet's it is not bound to the pod:
        kwok removes a deleted pod at once, and a bound token would die with it, while a real pod's
        token stays valid through its grace period (the beat elector releases its Lease then)."""
        spec: dict[str, Any] = {"expirationSeconds": max(600, seconds)}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{segment(namespace)}/serviceaccounts/{segment(service_account)}/token"
        data = self._call("POST", path, body=body)
        return str(data["status"]["token"])

    def patch_pod_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """The updated pod, or None when the pod is gone."""
        path = f"/api/v1/namespaces/{segment(namespace)}/pods/{segment(name)}/status"
        try:
            return cast(
                dict[str, Any],
                self._call("PATCH", path, body=json.loads(json.dumps(patch)),
                           content_type="application/strategic-merge-patch+json"),
            )  # fmt: skip
        except ApiError as err:
            if err.status in (404, 409):
                return None
            raise
