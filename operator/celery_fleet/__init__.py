"""celery-fleet: a Kubernetes operator for Celery worker fleets."""

__version__ = "0.1.0"
GROUP = "celeryfleet.io"
VERSION = "v1alpha1"
FIELD_MANAGER = "celery-fleet"
