"""Code that runs inside the user's `celery beat`, shipped in the elector's single file (see
`celery_fleet.elector.bundle`): standard library, Celery and the elector's modules only."""
