"""How the apiserver authorizes a request, for tests: the verb RBAC checks and rule matching.

Tests feed it the requests a recording fake of the API saw (tests/support/fake_api.py) and the
rules celery_fleet.rbac.rules declares, so a reconcile that sends a request its RBAC does not grant fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Request:
    """The authorization attributes of one API request, as the apiserver derives them."""

    verb: str
    api_group: str
    resource: str  # with the subresource, e.g. "deployments/scale"
    namespace: str | None
    name: str | None


_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def requests_for(
    method: str, path: str, query: Mapping[str, str] | None = None, *, apply: bool = False
) -> list[Request]:
    """What RBAC checks for a request; an apply PATCH may create, so it is checked as both."""
    m = _PATH.match(path.split("?", 1)[0])
    if m is None:
        raise ValueError(f"not a resource path: {path}")
    group = "" if m["core"] else m["group"]
    resource = m["resource"] + (f"/{m['sub']}" if m["sub"] else "")
    query = query or {}
    if method == "GET":
        verb = "get" if m["name"] else ("watch" if query.get("watch") in ("true", "1") else "list")
    elif method == "DELETE" and not m["name"]:
        verb = "deletecollection"
    else:
        verb = _VERBS[method]
    found = [Request(verb, group, resource, m["namespace"], m["name"])]
    if apply and method == "PATCH" and not m["sub"]:
        found.append(Request("create", group, resource, m["namespace"], m["name"]))
    return found


def allows(rules: Iterable[Mapping[str, Any]], request: Request) -> bool:
    """RBAC's rule matching (no wildcards are used here, but they are honoured)."""
    for rule in rules:
        if not _matches(rule.get("apiGroups", []), request.api_group):
            continue
        if not _matches(rule.get("resources", []), request.resource):
            continue
        if not _matches(rule.get("verbs", []), request.verb):
            continue
        names = rule.get("resourceNames") or []
        # RBAC cannot narrow create (and list/watch without a fieldSelector) by name.
        if names and (request.name is None or request.name not in names):
            continue
        return True
    return False


def _matches(allowed: Sequence[str], value: str) -> bool:
    return "*" in allowed or value in allowed
