"""Talking to a tier's Celery workers (remote control over the broker): the adapter behind scale-in."""
