"""A recording fake of kubernetes.client.ApiClient for unit tests of the reconcilers.

It answers what a fresh apiserver would for the calls the operator makes (a Secret's broker URL,
an apply echoed back with a uid) and records every call, so a test checks what a reconcile
decided to send without a cluster.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kubernetes.client.rest import ApiException

from tests.support.rbac_check import Request, requests_for

APPLY = "application/apply-patch+yaml"


class RecordingApi:
    """Stands in for kubernetes.client.ApiClient: records (method, path, query, content type)."""

    def __init__(self, broker_url: str | None = "redis://redis.shop.svc:6379/0") -> None:
        self.broker_url = broker_url  # every Secret's key holds it; None: no Secret exists
        self.calls: list[tuple[str, str, dict[str, str], str]] = []
        self.writes: list[tuple[str, str, Any]] = []  # (method, path, body) of every call that is not a GET

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        query = dict(kwargs.get("query_params") or [])
        content_type = (kwargs.get("header_params") or {}).get("Content-Type", "")
        body = kwargs.get("body")
        self.calls.append((method, path, query, content_type))
        if method != "GET":
            self.writes.append((method, path, json.loads(json.dumps(body))))
        if method == "GET" and "/secrets/" in path:
            if self.broker_url is None:
                raise ApiException(status=404, reason="Not Found")
            namespace, name = path.split("/")[4], path.split("/")[6]
            meta = {"namespace": namespace, "name": name}
            return {"metadata": meta, "data": {"url": base64.b64encode(self.broker_url.encode()).decode()}}, 200, {}
        if method == "PATCH" and content_type == APPLY:
            applied = json.loads(json.dumps(body))
            applied["metadata"].setdefault("uid", "child-uid")
            return applied, 200, {}
        return {}, 200, {}

    def applied(self) -> list[dict[str, Any]]:
        """The objects sent with server-side apply, in order."""
        return [b for (m, path, b) in self.writes if m == "PATCH" and isinstance(b, dict) and "kind" in b]

    def statuses(self) -> list[dict[str, Any]]:
        """The status patches sent, in order."""
        return [b["status"] for (m, path, b) in self.writes if m == "PATCH" and path.endswith("/status")]

    def deleted(self) -> list[str]:
        """The paths of the DELETE requests, in order."""
        return [path for (m, path, _) in self.writes if m == "DELETE"]

    def requests(self) -> list[Request]:
        """What RBAC checks for the recorded calls."""
        found: list[Request] = []
        for method, path, query, content_type in self.calls:
            found += requests_for(method, path, query, apply=content_type == APPLY)
        return found
