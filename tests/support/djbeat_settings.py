"""Django settings for the django-celery-beat test: SQLite at $DJBEAT_DB, UTC."""

from __future__ import annotations

import os

SECRET_KEY = "test-only-not-secret"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("DJBEAT_DB", "djbeat.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
