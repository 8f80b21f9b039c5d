"""`python -m celery_fleet.localrun`: the local runtime without the `celery-fleet` entry point."""

import sys

from celery_fleet.localrun import main

sys.exit(main())
