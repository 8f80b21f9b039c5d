import sys

from celery_fleet.rbac.render import main

sys.exit(main())
