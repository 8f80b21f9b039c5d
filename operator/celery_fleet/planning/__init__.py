"""celery_fleet.planning."""
