"""metrics.OwnedGauge: what a scrape shows is what prometheus_client's Gauge would show, and removing
one pool's (tier's, queue's) series leaves every other series alone."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from celery_fleet.metrics import OwnedGauge

LABELS = ("namespace", "pool", "tier", "queue_name")
SAMPLES = {
    ("shop", "orders", "high", "q1"): 3,
    ("shop", "orders", "low", "q2"): 0,
    ("shop", "mail", "high", "q1"): 7.5,
    ("other", "orders", "high", "q1"): 1,
}


def _scrape(samples: dict[tuple[str, ...], float], owned: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    if owned:
        g = OwnedGauge("depth", "Messages.", LABELS, registry)
        for labels, v in samples.items():
            g.set(labels, v)
    else:
        plain = Gauge("depth", "Messages.", LABELS, registry=registry)
        for labels, v in samples.items():
            plain.labels(*labels).set(v)
    return generate_latest(registry)


def _lines(text: bytes) -> set[bytes]:
    return set(text.splitlines())


def test_a_scrape_reads_as_prometheus_clients_gauge() -> None:
    assert _lines(_scrape(SAMPLES, owned=True)) == _lines(_scrape(SAMPLES, owned=False))
    assert _lines(_scrape({}, owned=True)) == _lines(_scrape({}, owned=False))  # HELP and TYPE, no samples


def test_removing_a_pools_tier_or_queue_leaves_the_others() -> None:
    g = OwnedGauge("depth", "Messages.", LABELS, CollectorRegistry())
    for labels, v in SAMPLES.items():
        g.set(labels, v)
    g.remove_by_labels({"namespace": "shop", "pool": "orders", "tier": "low"})
    assert g.get(("shop", "orders", "low", "q2")) is None
    assert g.get(("shop", "orders", "high", "q1")) == 3.0
    g.remove_by_labels({"namespace": "shop", "pool": "orders"})
    assert g.get(("shop", "orders", "high", "q1")) is None
    assert g.get(("shop", "mail", "high", "q1")) == 7.5  # same namespace, another pool
    assert g.get(("other", "orders", "high", "q1")) == 1.0  # same name, another namespace
    g.remove_by_labels({"namespace": "gone", "pool": "never"})  # nothing to remove is no error


def test_a_wrong_number_of_labels_is_refused() -> None:
    g = OwnedGauge("depth", "Messages.", LABELS, CollectorRegistry())
    with pytest.raises(ValueError, match="4 label values"):
        g.set(("shop", "orders"), 1)
