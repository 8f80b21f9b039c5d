"""celery_fleet.handlers."""
