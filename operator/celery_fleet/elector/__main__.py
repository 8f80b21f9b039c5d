"""`python -m celery_fleet.elector` and the single-file elector beat pods run (see `bundle`)."""

import sys

from celery_fleet.elector.cli import main

if __name__ == "__main__":
    sys.exit(main())
