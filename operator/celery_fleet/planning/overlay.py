"""Strategic merge of a pod-template overlay onto a generated pod template. (pure)

Kubernetes' strategic merge patch without its directives: maps merge key by key, lists whose items
have a merge key (as the PodSpec declares `patchMergeKey`) merge item by item, other lists and
scalars replace. Unlike a JSON merge patch, an overlay naming the `worker` container adds fields to
it instead of replacing the whole containers list, as prometheus-operator's `containers` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Field name -> merge key, from the PodSpec's patchMergeKey tags (the names are unique in a pod template).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "hostAliases": "ip",
}


def _merge_list(base: list[Any], overlay: list[Any], key: str) -> list[Any]:
    merged = list(base)
    where = {item.get(key): i for i, item in enumerate(merged) if isinstance(item, Mapping)}
    for item in overlay:
        index = where.get(item.get(key)) if isinstance(item, Mapping) else None
        if index is None:
            merged.append(item)
        else:
            merged[index] = merge(merged[index], item)
    return merged


def merge(base: Any, overlay: Any) -> Any:
    """`overlay` merged onto `base` (neither is modified); None in the overlay leaves base as it is."""
    if overlay is None:
        return base
    if not (isinstance(base, Mapping) and isinstance(overlay, Mapping)):
        return overlay
    merged = dict(base)
    for name, value in overlay.items():
        if value is None:
            continue
        ours = merged.get(name)
        if name in MERGE_KEYS and isinstance(ours, list) and isinstance(value, list):
            merged[name] = _merge_list(ours, value, MERGE_KEYS[name])
        else:
            merged[name] = merge(ours, value)
    return merged
