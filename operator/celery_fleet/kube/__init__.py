"""celery_fleet.kube."""
