"""The manifests of deploy/samples/ as objects a watch would deliver (namespace, uid, generation set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"


def sample(name: str, kind: str, namespace: str = "shop") -> dict[str, Any]:
    """The first object of `kind` in deploy/samples/`name`, as read from a namespace."""
    docs = yaml.safe_load_all((SAMPLES / name).read_text())
    body = dict(next(d for d in docs if d and d["kind"] == kind))
    body["metadata"].update(namespace=namespace, uid=f"{kind.lower()}-uid", generation=1, resourceVersion="7")
    return body
