"""celery_fleet.api: the celeryfleet.io/v1alpha1 API.

`models` holds the pydantic models of CeleryWorkerPool and CeleryBeat (the single source of the
API, with the validation rules); `crdgen` turns them into the CRDs in `crds/` and the chart.
No I/O here.
"""
