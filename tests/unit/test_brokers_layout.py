"""Finding priority lists the spec does not name (kombu transport options that differ)."""

from __future__ import annotations

import pytest

from celery_fleet.brokers import queue_refs
from celery_fleet.brokers.layout import mismatch_message, unconfigured_lists
from celery_fleet.brokers.source import KeyLayout

SEP = "\x06\x16"
(CELERY,) = queue_refs(["celery"])


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        pytest.param(["celery", f"celery{SEP}3", f"celery{SEP}9"], [], id="configured-lists-are-fine"),
        pytest.param(["celery:3", "celery:6"], ["celery:3", "celery:6"], id="other-sep"),
        pytest.param([f"celery{SEP}1", f"celery{SEP}2"], [f"celery{SEP}1", f"celery{SEP}2"], id="other-steps"),
        pytest.param(["celery2", "celery_v2", "celery.v2", "celeryx:1"], [], id="other-queues"),
    ],
)
def test_unconfigured_lists(keys: list[str], found: list[str]) -> None:
    assert unconfigured_lists(keys, [CELERY]).get(CELERY, []) == found


def test_prefix_is_part_of_the_name() -> None:
    (ref,) = queue_refs(["q"], layout=KeyLayout("app1:"))
    assert unconfigured_lists(["app1:q:3", "q:3"], [ref]) == {ref: ["app1:q:3"]}


def test_message_names_the_lists_escaped_and_the_fix() -> None:
    message = mismatch_message({CELERY: [f"celery{SEP}{i}" for i in (1, 2, 4, 5, 7, 8)]})
    assert message is not None
    assert "celery\\x06\\x161" in message and "and 1 more" in message and "spec.broker.prioritySteps" in message
    assert mismatch_message({}) is None
