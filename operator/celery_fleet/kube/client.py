"""A small, typed surface over the apiserver's REST API (kube.login's transport, or the official client).

Request building (paths from apiVersion/kind) is separated from sending. Every write
of a child object is a server-side apply under one field manager, so repeated
reconciles are idempotent and hand edits of fields we own are taken back.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import urllib3

from celery_fleet import FIELD_MANAGER
from celery_fleet.api.models import API_VERSION, BEAT_KIND, POOL_KIND
from celery_fleet.kube.login import Transport, load_credentials

if TYPE_CHECKING:
    from kubernetes import client

log = logging.getLogger(__name__)

SECRET_MAX_AGE = 30.0
CREATE_ONLY_RESOURCE_VERSION = "1"

# kind -> (plural, namespaced); the only kinds the operator writes or reads.
_RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("apps/v1", "Deployment"): ("deployments", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Pod"): ("pods", True),  # scale-in: list a tier's pods, set their pod-deletion-cost
    ("apps/v1", "ReplicaSet"): ("replicasets", True),  # scale-in: which pods a tier Deployment owns
    ("v1", "ConfigMap"): ("configmaps", True),  # spec.broker.tls.ca.configMapName
    ("v1", "Event"): ("events", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
    (API_VERSION, POOL_KIND): ("celeryworkerpools", True),
    (API_VERSION, BEAT_KIND): ("celerybeats", True),
}


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a collection or object, e.g. /apis/apps/v1/namespaces/ns/deployments/x."""
    try:
        plural, namespaced = _RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"celery-fleet does not manage {kind} ({api_version})") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced:
        if not namespace:
            raise ValueError(f"{kind} is namespaced: a namespace is required")
        base += f"/namespaces/{segment(namespace)}"
    path = f"{base}/{plural}"
    return f"{path}/{segment(name)}" if name else path


def segment(value: str) -> str:
    """One path segment, escaped: names come from users' specs and must never add segments.

    `..` and `.` are refused outright: escaping leaves them as they are, and a client or proxy
    that normalises the path would climb out of the namespace with them.
    """
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} is not an object name")
    return urllib.parse.quote(value, safe="")


def request_resource(path: str) -> str:
    """The resource a request path names, e.g. "deployments/scale" (names and namespaces left out)."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # past /api/v1 or /apis/group/version
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    return "/".join(rest[:1] + rest[2:3])


def connect(kubeconfig: str | None = None, context: str | None = None, *, maxsize: int = 32) -> Transport:
    """The operator's transport: in-cluster when running in a pod, else the kubeconfig (see kube.login)."""
    return Transport(load_credentials(kubeconfig, context), maxsize=maxsize)


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """The official client, for the tools that use it (leader election, the local runtime); not the operator."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return client.ApiClient(cfg)


class CallApi(Protocol):
    """What Kube sends through: our Transport, or the official client's ApiClient."""

    def call_api(self, resource_path: str, method: str, **kwargs: Any) -> Any: ...


@dataclass(eq=False)  # not frozen: raising sets __traceback__ (a frozen one fails inside `with` blocks)
class ApiError(Exception):
    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"

    @classmethod
    def from_exception(cls, exc: Any) -> ApiError:
        """From an error answer: our HttpError or the official client's ApiException (same attributes)."""
        message = exc.reason or ""
        reason = str(exc.reason or "")
        try:
            body = json.loads(exc.body or "{}")
            message = body.get("message", message)
            reason = body.get("reason", reason)
        except (ValueError, TypeError):
            pass
        return cls(status=int(exc.status or 0), reason=reason, message=message)


class Kube:
    """The operator's Kubernetes writes and the few reads it cannot take from its watch caches."""

    def __init__(self, api: CallApi, field_manager: str = FIELD_MANAGER) -> None:
        self.api = api
        self.field_manager = field_manager
        # Counted for benchmarks and /metrics: requests this process made outside Kopf's watches,
        # by (verb, resource[/subresource]).
        self.requests_by: dict[tuple[str, str], int] = {}
        self._count_lock = threading.Lock()  # requests come from many worker threads
        self._secrets: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        """One apiserver request; every failure, answered or not, is an ApiError."""
        counted = (method, request_resource(path))
        with self._count_lock:
            self.requests_by[counted] = self.requests_by.get(counted, 0) + 1
        try:
            data, _status, _headers = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                response_type="object",
                _preload_content=True,
                _request_timeout=timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # No answer at all (apiserver restarting, network cut, timeout): an API error like any
            # other, so callers retry with backoff instead of crashing with a traceback.
            raise ApiError(status=0, reason="Unreachable", message=f"{type(exc).__name__}: {exc}"[:500]) from None
        except Exception as exc:
            if not isinstance(getattr(exc, "status", None), int) or not hasattr(exc, "body"):
                raise
            raise ApiError.from_exception(exc) from None
        return data

    @property
    def requests(self) -> int:
        return sum(self.requests_by.values())

    def apply(
        self, obj: Mapping[str, Any], *, force: bool = True, create_only: bool = False, uid: str | None = None
    ) -> dict[str, Any]:
        """Server-side apply of a full desired object under our field manager.

        `force` takes our fields back from other managers, so it must only reach objects we own:
        `create_only` makes the apply fail with 409 if the object exists at all, and `uid` fails it
        (422, uid is immutable) if the object by that name is no longer the one we judged ours.
        """
        meta = dict(obj["metadata"])
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if create_only:
            # A resourceVersion precondition: no existing object can be at revision 1 (etcd's first
            # write is revision 2), and on create the apiserver ignores it.
            meta["resourceVersion"] = CREATE_ONLY_RESOURCE_VERSION
        if uid:
            meta["uid"] = uid
        query = [("fieldManager", self.field_manager), ("force", "true" if force else "false")]
        body = {**obj, "metadata": meta}
        return cast(
            dict[str, Any],
            self.request("PATCH", path, body=body, query=query, content_type="application/apply-patch+yaml"),
        )

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object, or None when absent; an answer for any other object is an error, not data."""
        try:
            obj = cast(dict[str, Any], self.request("GET", resource_path(api_version, kind, namespace, name)))
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("namespace") != namespace or meta.get("name") != name:
            # Never hand on what a path trick (or a confused proxy) returned from elsewhere.
            raise ApiError(status=0, reason="WrongObject", message=f"asked for {kind} {namespace}/{name}, got another")
        return obj

    def delete(self, api_version: str, kind: str, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete with background propagation; False when it was already gone.

        With `uid`, only that object: one that replaced it under the same name answers 409.
        """
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", resource_path(api_version, kind, namespace, name), body=body)
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        path = resource_path(api_version, kind, namespace, name) + "/status"
        self.request("PATCH", path, body={"status": dict(status)}, content_type="application/merge-patch+json")

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource (the autoscaler's only write)."""
        path = resource_path("apps/v1", "Deployment", namespace, deployment) + "/scale"
        self.request(
            "PATCH",
            path,
            body={"spec": {"replicas": replicas}},
            query=[("fieldManager", self.field_manager)],
            content_type="application/merge-patch+json",
        )

    def secret_value(self, namespace: str, name: str, key: str, *, reader: str = "") -> str | None:
        """A Secret's decoded value, or None when the Secret or key is absent. Never logged.

        Reconciles run on every child or Lease event (a beat's Lease renews every few seconds) and
        Secrets are not watched (that would need list/watch on every Secret). So a Secret that was
        found is reused for the same `reader` (the asking object's uid and resourceVersion) for at
        most SECRET_MAX_AGE: any change to that object, or the age, reads it again; a missing
        Secret is read again on every retry.
        """
        now = time.monotonic()
        cache_key = (namespace, name, reader)
        cached = self._secrets.get(cache_key)
        if cached is not None and now - cached[0] < SECRET_MAX_AGE:
            secret: dict[str, Any] | None = cached[1]
        else:
            secret = self.get("v1", "Secret", namespace, name)
            self._secrets = {k: v for k, v in self._secrets.items() if now - v[0] < SECRET_MAX_AGE}
            if secret is None:
                return None
            if reader:
                self._secrets[cache_key] = (now, secret)
        assert secret is not None
        raw = (secret.get("data") or {}).get(key)
        if raw is None:
            string_data = (secret.get("stringData") or {}).get(key)
            return str(string_data) if string_data is not None else None
        # Bytes that are not UTF-8 become U+FFFD: the value then fails the URL checks with a
        # condition naming the Secret, instead of crashing every reconcile of the pool.
        return base64.b64decode(raw).decode("utf-8", errors="replace")

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        data = self.request("GET", resource_path(api_version, kind, namespace), query=query)
        items = list(cast(dict[str, Any], data).get("items") or [])
        if any((item.get("metadata") or {}).get("namespace") != namespace for item in items):
            raise ApiError(status=0, reason="WrongObject", message=f"asked for {kind} in {namespace}, got others")
        return items
