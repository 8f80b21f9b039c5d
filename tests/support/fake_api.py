"""A recording fake of kubernetes.client.ApiClient for unit tests of the reconcilers.

It answers what a fresh apiserver would for the calls the operator makes (a Secret's broker URL,
an apply echoed back with a uid) and records every call, so a test checks what a reconcile
decided to send without a cluster.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.support.rbac_check import Request, requests_for

APPLY = "application/apply-patch+yaml"


class RecordingApi:
    """Stands in for kubernetes.client.ApiClient: records (method, path, query, content type)."""

    def __init__(self, broker_url: str = "redis://redis.shop.svc:6379/0") -> None:
        self.broker_url = broker_url
        self.calls: list[tuple[str, str, dict[str, str], str]] = []
        self.applies: list[dict[str, Any]] = []  # the objects sent with server-side apply, in order

    def call_api(self, path: str, method: str, **kwargs: Any) -> tuple[Any, int, dict[str, str]]:
        query = dict(kwargs.get("query_params") or [])
        content_type = (kwargs.get("header_params") or {}).get("Content-Type", "")
        body = kwargs.get("body")
        self.calls.append((method, path, query, content_type))
        if method == "GET" and "/secrets/" in path:
            namespace, name = path.split("/")[4], path.split("/")[6]
            meta = {"namespace": namespace, "name": name}
            return {"metadata": meta, "data": {"url": base64.b64encode(self.broker_url.encode()).decode()}}, 200, {}
        if method == "PATCH" and content_type == APPLY:
            applied = json.loads(json.dumps(body))
            self.applies.append(json.loads(json.dumps(body)))
            applied["metadata"].setdefault("uid", "child-uid")
            return applied, 200, {}
        return {}, 200, {}

    def requests(self) -> list[Request]:
        """What RBAC checks for the recorded calls."""
        found: list[Request] = []
        for method, path, query, content_type in self.calls:
            found += requests_for(method, path, query, apply=content_type == APPLY)
        return found
