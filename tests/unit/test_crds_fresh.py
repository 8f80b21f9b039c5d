"""The committed CRDs (crds/ and the chart copy) are what the models generate today."""

from __future__ import annotations

from celery_fleet.api import crdgen


def test_generated_crds_are_fresh() -> None:
    stale = crdgen.stale_files(crdgen.repo_root())
    assert not stale, f"{crdgen.STALE_MESSAGE} (stale: {', '.join(str(p) for p in stale)})"
