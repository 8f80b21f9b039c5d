"""celery_fleet.api."""
