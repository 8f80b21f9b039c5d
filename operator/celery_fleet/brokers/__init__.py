"""celery_fleet.brokers."""
