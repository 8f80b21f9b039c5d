"""The committed CRDs (crds/ and the chart copy) are what the models generate today."""

from __future__ import annotations

from celery_fleet.api import crdgen, generated


def test_generated_crds_are_fresh() -> None:
    stale = generated.stale_files(generated.REPO_ROOT, crdgen.generated_files())
    assert not stale, f"{crdgen.STALE_MESSAGE} (stale: {', '.join(str(p) for p in stale)})"
