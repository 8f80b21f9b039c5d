"""Lists that look like priority sub-lists of a watched queue but are not configured (pure).

An app whose kombu transport options differ from the pool's spec (``sep``, ``priority_steps``)
puts messages in lists the poll never reads. A bounded SCAN now and then (not per poll) finds
them: a key is suspect when it is a watched queue's name (with its key prefix) followed by a
short non-alphanumeric separator and a digit, and the spec does not name it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from celery_fleet.brokers.source import QueueRef

MAX_SUFFIX: Final = 9  # separator (up to 8 characters, as spec.broker.sep) + one digit
MAX_REPORTED: Final = 5


def configured_keys(ref: QueueRef) -> set[str]:
    return {ref.keyprefix + (ref.name if s == 0 else f"{ref.name}{ref.sep}{s}") for s in ref.priority_steps}


def unconfigured_lists(keys: Iterable[str], refs: Iterable[QueueRef]) -> dict[QueueRef, list[str]]:
    """For each queue, the list keys that look like its priority sub-lists and are not read."""
    bases: dict[str, list[QueueRef]] = {}
    configured: set[str] = set()
    for ref in refs:
        bases.setdefault(ref.keyprefix + ref.name, []).append(ref)
        configured |= configured_keys(ref)
    found: dict[QueueRef, list[str]] = {}
    for key in keys:
        if key in configured or not key[-1:].isdigit():
            continue
        for cut in range(2, min(MAX_SUFFIX, len(key) - 1) + 1):
            sep = key[-cut:-1]
            if any(c.isalnum() for c in sep):
                break  # longer cuts only add more of the name
            for ref in bases.get(key[:-cut], ()):
                found.setdefault(ref, []).append(key)
    return {ref: sorted(set(keys))[: MAX_REPORTED * 4] for ref, keys in found.items()}


def show_key(key: str) -> str:
    """A key as it may appear in a message: control characters escaped, bounded length."""
    text = key.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else text[:77] + "..."


def mismatch_message(found: Mapping[QueueRef, list[str]]) -> str | None:
    if not found:
        return None
    parts = []
    for ref, keys in sorted(found.items()):
        shown = ", ".join(show_key(k) for k in keys[:MAX_REPORTED])
        more = f" and {len(keys) - MAX_REPORTED} more" if len(keys) > MAX_REPORTED else ""
        parts.append(f"queue {show_key(ref.name)}: {shown}{more}")
    return (
        "lists that look like priority sub-lists exist but are not read ("
        + "; ".join(parts)
        + "); their messages are not counted. Set spec.broker.sep and spec.broker.prioritySteps to the "
        "app's broker_transport_options"
    )
