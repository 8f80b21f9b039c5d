"""`python -m celery_fleet_localrun`: the local runtime without the `celery-fleet` entry point."""

import sys

from celery_fleet_localrun import main

sys.exit(main())
