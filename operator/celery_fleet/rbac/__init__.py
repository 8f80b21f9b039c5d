"""The operator's RBAC: :mod:`.rules`, every permission it holds beside its reason and the code that
needs it (the one source), and :mod:`.render`, which writes it into the chart and ``deploy/``
(``python -m celery_fleet.rbac``; ``--check`` fails when they are stale)."""
