"""Which cached pools and beats are gone though no DELETED event said so.

Kopf, watching namespaces by glob, stops watching a namespace as soon as it is marked for deletion:
the DELETED events of the objects in it never arrive. A periodic LIST per namespace is the check:
an object cached before the LIST began (same uid) and absent from it is gone. One created while
the LIST ran was not in the snapshot, or has another uid: it is never dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

ObjKey = tuple[str, str]


def gone(snapshot: Mapping[ObjKey, str | None], namespace: str, listed_uids: Collection[str]) -> list[ObjKey]:
    """Keys of `namespace` in `snapshot` (key -> uid, taken before the LIST) whose uid the LIST lacks.
    A cached object without a uid is never judged gone (nothing to compare)."""
    listed = set(listed_uids)
    return [key for key, uid in snapshot.items() if key[0] == namespace and uid is not None and uid not in listed]
